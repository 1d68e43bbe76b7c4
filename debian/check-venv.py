"""The .deb's build-time check, run by debian/rules with the built venv's python.

Every module of the elemta package imports (with the pinned dependencies, none from the
system), each program answers --version or --help, and the configuration shipped as the
template of /etc/elemta/elemta.yaml loads and validates. Files it names (credentials) and
master.user (elemta) do not exist on the build host, so they are not opened here:
`elemta --check-config` does that on the installed system.
"""
import importlib
import os
import pkgutil
import shutil
import sys
import tempfile

import elemta
from elemta.config import load_config

failures = []
for info in pkgutil.walk_packages(elemta.__path__, "elemta."):
    try:
        importlib.import_module(info.name)
    except Exception as exc:        # report them all, then fail
        failures.append("%s: %r" % (info.name, exc))
if sys.prefix == sys.base_prefix:
    failures.append("not running inside the venv")
for dist in ("prometheus_client", "checkdmarc", "gevent", "lmdb"):
    module = importlib.import_module(dist)
    if not module.__file__.startswith(sys.prefix):
        failures.append("%s comes from %s, not the venv" % (dist, module.__file__))
from elemta.cli import elemta as elemta_cli
try:
    elemta_cli.main(["--version"])
except SystemExit as exit:
    if exit.code not in (0, None):
        failures.append("elemta --version exited %r" % exit.code)
with tempfile.TemporaryDirectory() as scratch:      # the loader goes by the suffix
    shipped = os.path.join(scratch, "elemta.yaml")
    shutil.copyfile(sys.argv[1], shipped)
    load_config(shipped, check_files=False)
if failures:
    sys.exit("check-venv: " + "\n".join(failures))
print("check-venv: %d modules import, config %s loads; elemta %s"
      % (len(list(pkgutil.walk_packages(elemta.__path__, "elemta."))), sys.argv[1],
         elemta.__version__))
