"""hooks/submit_filter run exactly as TORQUE 6.1's qsub runs a SUBMITFILTER.

A batch job (qsub_functions.c, get_script): `/bin/sh -c "FILTER 'arg' 'arg'... >TMP"` (popen),
the script written to its stdin, each of qsub's arguments in single quotes (a `-C` value
unquoted, its first character backslash-escaped), its stdout the script qsub then reads.
An interactive job (process_opts): `FILTER "arg" "arg"... <TMP >TMP2` (system), stdin two empty
lines. Exit 0 submits; 255 is qsub's "administratively rejected", shown after the filter's stderr.

Each test that accepts a job also shows the filter refusing its twin, so a filter that judges
nothing fails every test.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import subprocess
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import pytest

from tests.conftest import ROOT

FILTER = ROOT / "hooks" / "submit_filter"
REFUSED = 255  # qsub: "Your job has been administratively rejected by the queueing system."


class Outcome(NamedTuple):
    code: int
    script: bytes  # what qsub would read back as the job script
    stderr: str


def qsub_command(filter_path: Path, args: list[str], quote: str) -> str:
    """The filter's command line as qsub builds it."""
    words = [str(filter_path)]
    prefix_value = False
    for arg in args:
        if prefix_value and quote == "'":
            words.append("\\" + arg)  # get_script: a -C value goes unquoted, its '#' escaped
        else:
            words.append(f"{quote}{arg}{quote}")
        prefix_value = arg == "-C"
    return " ".join(words)


def run_batch(args: list[str], script: bytes, tmp_path: Path, filter_path: Path = FILTER) -> Outcome:
    """qsub ARGS (a batch job): the script on the filter's stdin, its stdout into a file."""
    out = tmp_path / "qsub.filtered"
    done = subprocess.run(
        ["/bin/sh", "-c", f"{qsub_command(filter_path, args, chr(39))} >{out}"],
        input=script,
        stderr=subprocess.PIPE,
        timeout=30,
    )
    return Outcome(done.returncode, out.read_bytes(), done.stderr.decode())


def run_interactive(args: list[str], tmp_path: Path, filter_path: Path = FILTER) -> Outcome:
    """qsub -I ARGS: the filter gets two empty lines, through system() and redirections."""
    given, out = tmp_path / "qsub.resources", tmp_path / "qsub.filtered"
    given.write_bytes(b"\n\n")
    done = subprocess.run(
        ["/bin/sh", "-c", f"{qsub_command(filter_path, args, chr(34))} <{given} >{out}"],
        stderr=subprocess.PIPE,
        timeout=30,
    )
    return Outcome(done.returncode, out.read_bytes(), done.stderr.decode())


def assert_refused(outcome: Outcome, *words: str) -> None:
    assert outcome.code == REFUSED, outcome
    assert outcome.stderr.startswith("qsub: vmpool: job refused: "), outcome.stderr
    assert outcome.stderr.count("\n") == 1  # one sentence, no traceback
    for word in words:
        assert word in outcome.stderr


def assert_passed(outcome: Outcome, script: bytes) -> None:
    assert (outcome.code, outcome.stderr) == (0, ""), outcome
    assert outcome.script == script  # byte for byte


def load_filter() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("submit_filter", str(FILTER))
    spec = importlib.util.spec_from_loader("submit_filter", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


SCRIPT = (
    b"#!/bin/bash\n#PBS -N analysis\n#PBS -l walltime=01:00:00\n#PBS -l nodes=1:ppn=4\n\n"
    b"cd \"$PBS_O_WORKDIR\"\necho '\xe9t\xe9 \xff' | tr -d x  # not UTF-8\nexit 0"
)  # no final newline


def test_a_one_node_job_to_the_pool_queue_passes_byte_for_byte(tmp_path: Path) -> None:
    assert_passed(run_batch(["-q", "vmpool", "job.sh"], SCRIPT, tmp_path), SCRIPT)
    assert_refused(run_batch(["-q", "vmpool", "job.sh"], SCRIPT.replace(b"nodes=1:", b"nodes=2:"), tmp_path))


def test_nodes_2_on_the_command_line_is_refused_naming_the_pool_limit(tmp_path: Path) -> None:
    outcome = run_batch(["-q", "vmpool", "-l", "nodes=2", "job.sh"], SCRIPT, tmp_path)
    assert_refused(outcome, "queue vmpool", "at most 1 node", "asks for 2 (-l nodes=2)", "nodes=1")


def test_nodes_2_in_the_script_is_refused(tmp_path: Path) -> None:
    script = b"#!/bin/sh\n#PBS -q vmpool\n#PBS -l nodes=2:ppn=1\nhostname\n"
    assert_refused(run_batch([], script, tmp_path), "at most 1 node", "asks for 2 (-l nodes=2:ppn=1)")


def test_an_interactive_job_to_the_pool_queue_is_refused(tmp_path: Path) -> None:
    assert_refused(run_interactive(["-I", "-q", "vmpool", "-l", "nodes=1"], tmp_path), "interactive", "qsub -I")
    assert_refused(run_interactive(["-Iq", "vmpool"], tmp_path), "interactive")  # getopt's bundled flags
    # The same for another queue: not the pool's to judge; what qsub reads back is unchanged.
    assert_passed(run_interactive(["-I", "-q", "batch"], tmp_path), b"\n\n")


def test_a_job_to_another_queue_passes_untouched(tmp_path: Path) -> None:
    script = SCRIPT.replace(b"nodes=1:ppn=4", b"nodes=4:ppn=8+n017")
    assert_passed(run_batch(["-q", "batch", "job.sh"], script, tmp_path), script)
    assert_passed(run_batch(["-q", "batch@head", "job.sh"], script, tmp_path), script)
    assert_passed(run_batch(["job.sh"], script, tmp_path), script)  # the server's default queue
    assert_refused(run_batch(["-q", "vmpool@head", "job.sh"], script, tmp_path), "asks for 5")


# (qsub arguments, script): each refused as it stands; its twin (the one change in the third
# element applied) is the job qsub would submit as the pool can run it, and passes untouched.
QUOTING = {
    "double quotes": ([], b'#PBS -q "vmpool"\n#PBS -l "nodes=2"\ntrue\n', (b'"nodes=2"', b'"nodes=1"')),
    "mixed quotes and a name with spaces": (
        ["-q", "vmpool"],
        b"#PBS -N \"my job\" -l 'nodes=2:ppn=1',walltime=1:00\ntrue\n",
        (b"2:", b"1:"),
    ),
    "backslash escapes": (["-q", "vmpool"], b"#PBS -l nodes\\=2\ntrue\n", (b"\\=2", b"\\=1")),
    "indented directive": (["-q", "vmpool"], b"#!/bin/sh\n   \t#PBS -l nodes=3\ntrue\n", (b"=3", b"=1")),
    "continued line": (["-q", "vmpool"], b"#PBS -l walltime=1:00:00,\\\nnodes=2\ntrue\n", (b"=2", b"=1")),
    "DOS line ends": (["-q", "vmpool"], b"#PBS -l nodes=2\r\ntrue\r\n", (b"=2", b"=1")),
    "a comment on the line": (["-q", "vmpool"], b"#PBS -l nodes=2 # two of them\ntrue\n", (b"=2 ", b"=1 ")),
    "the command line's -l over the script's, one resource at a time": (
        ["-l", "walltime=2:00:00"],
        b"#PBS -q vmpool\n#PBS -l nodes=2,walltime=1:00:00\ntrue\n",
        (b"#PBS -q vmpool\n", b"#PBS -q batch\n"),
    ),
    "the command line's -q over the script's": (
        ["-q", "vmpool"],
        b"#PBS -q batch\n#PBS -l nodes=2\ntrue\n",
        (b"=2", b"=1"),
    ),
    "a directive after the first command counts for nothing": (
        ["-q", "vmpool"],
        b"#PBS -l nodes=2\necho '#PBS -l nodes=1'\n#PBS -l nodes=1\n",
        (b"#PBS -l nodes=2\necho", b"echo"),
    ),
    "an unmatched quote hides that line only": (
        ["-q", "vmpool"],
        b"#PBS -N it's\n#PBS -l nodes=2\ntrue\n",
        (b"nodes=2", b"nodes=1"),
    ),
    "-C prefix": (
        ["-C", "#VM", "-q", "vmpool"],
        b"#PBS -l nodes=1\n#VM -l nodes=2\ntrue\n",
        (b"#VM -l nodes=2", b"#PBS -l nodes=2"),
    ),
}


@pytest.mark.parametrize("case", QUOTING)
def test_odd_quoting_in_the_script_is_read_as_qsub_reads_it(case: str, tmp_path: Path) -> None:
    args, script, (old, new) = QUOTING[case]
    assert_refused(run_batch(args, script, tmp_path))
    twin = script.replace(old, new)
    assert twin != script
    assert_passed(run_batch(args, twin, tmp_path), twin)


@pytest.mark.parametrize(
    ("nodes", "count"),
    [
        ("1", 1),
        ("2", 2),
        ("1:ppn=16", 1),
        ("2:ppn=4", 2),
        ("n001:ppn=2", 1),
        ("n001+n002", 2),
        ("3+2:ppn=1", 5),
        (" 2:gpus=1", 2),
        ("12abc", 12),
    ],
)
def test_nodes_are_counted_as_pbs_server_counts_them(nodes: str, count: int) -> None:
    assert load_filter().node_count(nodes) == count


def install_filter(tmp_path: Path, *settings: str, cfg: str = "") -> tuple[Path, subprocess.CompletedProcess[str]]:
    pbs_home = tmp_path / "torque"
    pbs_home.mkdir(exist_ok=True)
    if cfg:
        (pbs_home / "torque.cfg").write_text(cfg)
    dest = tmp_path / "sbin" / "vmpool-submit-filter"
    done = subprocess.run(
        [
            str(ROOT / "hooks" / "install"),
            "submit-filter",
            "--dest",
            str(dest),
            "--pbs-home",
            str(pbs_home),
            *(word for s in settings for word in ("--set", s)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return dest, done


def test_the_installer_sets_the_queue_and_leaves_torque_cfg_alone(tmp_path: Path) -> None:
    cfg = "SERVERHOST head\nSUBMITFILTER /opt/site/qsub_filter\n"
    dest, done = install_filter(tmp_path, "QUEUE=gpuvm", "MAX_NODES=1", cfg=cfg)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "torque" / "torque.cfg").read_text() == cfg
    assert f"SUBMITFILTER {dest}\n" in done.stdout
    assert "--set SITE_FILTER=/opt/site/qsub_filter" in done.stdout  # how to chain, not overwrite
    assert dest.stat().st_mode & 0o777 == 0o755
    script = b"#PBS -l nodes=2\ntrue\n"
    assert_refused(run_batch(["-q", "gpuvm"], script, tmp_path, dest), "queue gpuvm")
    assert_passed(run_batch(["-q", "vmpool"], script, tmp_path, dest), script)


def test_the_default_queue_setting_judges_jobs_that_name_no_queue(tmp_path: Path) -> None:
    dest, done = install_filter(tmp_path, "DEFAULT_QUEUE=vmpool")
    assert done.returncode == 0, done.stderr
    script = b"#PBS -l nodes=2\ntrue\n"
    assert_refused(run_batch([], script, tmp_path, dest), "queue vmpool")
    assert_passed(run_batch([], script, tmp_path), script)  # the default: DEFAULT_QUEUE unset


def test_the_installer_refuses_settings_the_filter_cannot_use(tmp_path: Path) -> None:
    for setting, message in [
        ("MAX_NODES=0", "MAX_NODES is '0'"),
        ('QUEUE=a"b', "use only letters"),
        ("WALLTIME=1", "unknown submit filter setting WALLTIME"),
        ("SITE_FILTER=/nonexistent/filter", "is not an executable file"),
    ]:
        dest, done = install_filter(tmp_path, setting)
        assert done.returncode == 1 and message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr and not dest.exists()


SITE_FILTER = """#!/bin/bash
# a site's filter: refuses jobs without walltime; otherwise adds its own directive first
script=$(cat; echo x)
if [[ $script != *walltime=* ]]; then echo "site: give a walltime" >&2; exit 255; fi
printf '#PBS -l %s\\n%s' "${SITE_RESOURCE:-mem=1gb}" "${script%x}"
"""


@pytest.mark.parametrize("site_resource", ["mem=1gb", "nodes=3"])
def test_a_site_filter_runs_first_and_its_output_is_what_is_judged(site_resource: str, tmp_path: Path) -> None:
    site = tmp_path / "site_filter"
    site.write_text(SITE_FILTER.replace("${SITE_RESOURCE:-mem=1gb}", site_resource))
    site.chmod(0o755)
    dest, done = install_filter(tmp_path, f"SITE_FILTER={site}")
    assert done.returncode == 0, done.stderr
    script = b"#PBS -l walltime=1:00:00\ntrue\n"
    outcome = run_batch(["-q", "vmpool"], script, tmp_path, dest)
    if site_resource == "nodes=3":
        assert_refused(outcome, "asks for 3")
    else:
        assert_passed(outcome, b"#PBS -l mem=1gb\n" + script)
    refused_by_site = run_batch(["-q", "vmpool"], b"true\n", tmp_path, dest)
    assert (refused_by_site.code, refused_by_site.stderr) == (REFUSED, "site: give a walltime\n")
