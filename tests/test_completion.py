"""`elemtactl completion bash|zsh` (issue 21 req 6): the scripts the packages install,
tried in the real shells. bash runs the completion function the way it does on TAB
(COMP_WORDS, COMP_CWORD); zsh checks the script's syntax (zsh -n).

See also: elemta/cli/completion.py, debian/rules and rpm/elemta.spec (they install it).
"""

import os
import shutil
import subprocess
import sys

import pytest

from tests.harness import REPO


def completion_script(shell):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    done = subprocess.run([sys.executable, "-m", "elemta.cli.elemtactl", "completion", shell],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def bash_script(tmp_path_factory):
    path = tmp_path_factory.mktemp("completion") / "elemtactl"
    path.write_text(completion_script("bash"))
    return str(path)


def complete(bash_script, line, cwd=None):
    """What bash offers on TAB at the end of line (words split on blanks)."""
    words = line.split(" ")
    program = ('source "$1"; shift; COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); '
               'COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}; '
               '_shtab_elemtactl elemtactl "${COMP_WORDS[COMP_CWORD]}" '
               '"${COMP_WORDS[COMP_CWORD-1]}"; printf "%s\\n" "${COMPREPLY[@]}"')
    done = subprocess.run(["bash", "--norc", "--noprofile", "-c", program, "bash",
                           bash_script] + words, capture_output=True, text=True, cwd=cwd,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    return sorted(set(filter(None, (w.strip() for w in done.stdout.splitlines()))))


def test_bash_completes_a_command(bash_script):
    assert complete(bash_script, "elemtactl qu") == ["queue"]
    assert "status" in complete(bash_script, "elemtactl ")


def test_bash_lists_the_queue_actions(bash_script):
    assert complete(bash_script, "elemtactl queue ") == sorted(
        ["list", "show", "cat", "hold", "release", "delete", "requeue", "flush", "summary",
         "reindex", "priority"])


def test_bash_completes_options_and_files(bash_script, tmp_path):
    assert complete(bash_script, "elemtactl queue list --js") == ["--json"]
    (tmp_path / "elemta.yaml").write_text("")
    assert complete(bash_script, "elemtactl queue list --config elem",
                    cwd=str(tmp_path)) == ["elemta.yaml"]


def test_bash_completes_report_and_top(bash_script, tmp_path):
    assert {"report", "top"} <= set(complete(bash_script, "elemtactl "))
    assert complete(bash_script, "elemtactl report --s") == ["--since"]
    assert complete(bash_script, "elemtactl top --o") == ["--once"]
    (tmp_path / "mail.log").write_text("")
    assert complete(bash_script, "elemtactl report --log mai",
                    cwd=str(tmp_path)) == ["mail.log"]


def test_the_script_knows_every_command_of_the_parser(bash_script):
    """Generated from the live parser: a command added later completes with no edit."""
    from elemta.cli.elemtactl import build_parser
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert complete(bash_script, "elemtactl ") == sorted(commands)


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed (make test "
                                                        "installs it)")
def test_zsh_script_is_valid_zsh(tmp_path):
    script = completion_script("zsh")
    assert script.startswith("#compdef elemtactl")
    path = tmp_path / "_elemtactl"
    path.write_text(script)
    done = subprocess.run(["zsh", "-n", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "queue" in script and "reindex" in script
