"""The scanner on real folders: filters, names, links, unreadable places, settling."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from featsync.model import RootState
from featsync.scan import ScanRules, hash_settled, scan

EXTS = frozenset({"jpg", "png"})


def rules(root: Path, **kw: object) -> ScanRules:
    base: dict[str, object] = {
        "root": str(root),
        "extensions": EXTS,
        "ignore": (".*", "*.tmp", "*~"),
    }
    base.update(kw)
    return ScanRules(**base)  # type: ignore[arg-type]


class Problems(list[tuple[str, dict[str, object]]]):
    def __call__(self, event: str, **fields: object) -> None:
        self.append((event, fields))


def test_extensions_and_ignore_globs_filter_names_and_folders(tmp_path: Path) -> None:
    for rel in [
        "a.jpg",
        "B.JPG",
        "c.png",
        "d.txt",
        "e.jpg.tmp",
        "f.jpg~",
        ".hidden.jpg",
        ".git/x.jpg",
        "sub/g.jpg",
        "noext",
    ]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    s = scan(rules(tmp_path), {}, Problems())
    assert sorted(s.files) == ["B.JPG", "a.jpg", "c.png", "sub/g.jpg"]
    assert s.complete and s.root_state is RootState.OK


def test_unchanged_stat_is_not_read_and_changed_content_is_hashed(tmp_path: Path) -> None:
    p = tmp_path / "a.jpg"
    p.write_bytes(b"one")
    os.utime(p, (1_000_000, 1_000_000))
    st = p.stat()
    known = {("a.jpg", st.st_size, st.st_mtime_ns, st.st_ino)}
    s = scan(rules(tmp_path), known, Problems())
    assert s.unchanged == {"a.jpg"} and s.files == {}
    p.write_bytes(b"three")
    os.utime(p, (1_000_000, 1_000_000))  # same mtime, other size: still caught
    s = scan(rules(tmp_path), known, Problems())
    assert (
        s.unchanged == frozenset()
        and s.files["a.jpg"].digest == hashlib.sha256(b"three").hexdigest()
    )


def test_a_file_modified_just_now_is_never_trusted_by_stat(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"fresh")
    f = scan(rules(tmp_path), {}, Problems()).files["a.jpg"]
    assert f.mtime_ns == 0  # recorded as 0: the next scan reads it again


def test_symlinks_are_not_followed_by_default_and_loops_are_harmless(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "a.jpg").write_bytes(b"x")
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(real)
    (root / "file.jpg").symlink_to(real / "a.jpg")
    (root / "loop").symlink_to(root)
    assert scan(rules(root), {}, Problems()).files == {}
    followed = scan(rules(root, follow_symlinks=True), {}, Problems())
    assert sorted(followed.files) == ["file.jpg", "link/a.jpg"]


@pytest.mark.skipif(sys.platform != "linux", reason="Linux file names are bytes")
def test_an_undecodable_name_is_reported_and_makes_the_scan_incomplete(tmp_path: Path) -> None:
    (tmp_path / "ok.jpg").write_bytes(b"x")
    with open(os.path.join(os.fsencode(tmp_path), b"bad-\xff.jpg"), "wb") as fh:
        fh.write(b"x")
    problems = Problems()
    s = scan(rules(tmp_path), {}, problems)
    assert sorted(s.files) == ["ok.jpg"] and not s.complete
    [(event, fields)] = problems
    assert event == "scan_problem" and "UTF-8" in str(fields["error"])
    assert "bad-\\xff.jpg" in str(fields["path"])


def test_a_twin_of_an_unchanged_file_is_reported_and_the_unchanged_one_kept(
    tmp_path: Path,
) -> None:
    nfc = tmp_path / "caf\u00e9.jpg"
    nfc.write_bytes(b"nfc")
    os.utime(nfc, (1_000_000, 1_000_000))
    st = nfc.stat()
    known = {("caf\u00e9.jpg", st.st_size, st.st_mtime_ns, st.st_ino)}
    (tmp_path / "cafe\u0301.jpg").write_bytes(b"nfd")
    problems = Problems()
    s = scan(rules(tmp_path), known, problems)
    assert s.unchanged == {"caf\u00e9.jpg"} and s.files == {} and not s.complete
    assert "same image ID" in str(problems[0][1]["error"])


def test_a_copy_with_the_same_size_and_mtime_is_read_again(tmp_path: Path) -> None:
    p = tmp_path / "a.jpg"
    p.write_bytes(b"one")
    os.utime(p, (1_000_000, 1_000_000))
    st = p.stat()
    known = {("a.jpg", st.st_size, st.st_mtime_ns, st.st_ino)}
    q = tmp_path / "b.tmp"
    q.write_bytes(b"two")  # same size
    os.utime(q, (1_000_000, 1_000_000))  # same mtime, as cp -p or rsync -t leave it
    q.replace(p)  # new inode
    s = scan(rules(tmp_path), known, Problems())
    assert s.files["a.jpg"].digest == hashlib.sha256(b"two").hexdigest()


def test_nfc_and_nfd_twins_are_reported_not_merged(tmp_path: Path) -> None:
    (tmp_path / "caf\u00e9.jpg").write_bytes(b"nfc")
    (tmp_path / "cafe\u0301.jpg").write_bytes(b"nfd")
    problems = Problems()
    s = scan(rules(tmp_path), {}, problems)
    assert list(s.files) == ["caf\u00e9.jpg"] and not s.complete
    assert "same image ID" in str(problems[0][1]["error"])


def test_missing_and_non_directory_roots_are_named(tmp_path: Path) -> None:
    assert scan(rules(tmp_path / "nope"), {}, Problems()).root_state is RootState.MISSING
    (tmp_path / "file").write_bytes(b"")
    s = scan(rules(tmp_path / "file"), {}, Problems())
    assert s.root_state is RootState.NOT_A_DIRECTORY and not s.complete


def test_a_file_that_changes_while_hashed_is_unsettled(tmp_path: Path) -> None:
    p = tmp_path / "a.jpg"
    p.write_bytes(b"first")
    seen = p.stat()
    p.write_bytes(b"second, longer")
    assert hash_settled(str(p), seen) is None
    assert hash_settled(str(p), p.stat()) is not None


UNREADABLE_SCRIPT = """
import json, sys
from featsync.scan import ScanRules, scan
events = []
s = scan(ScanRules(sys.argv[1], frozenset({"jpg"}), ()), {},
         lambda e, **f: events.append([e, f]))
print(json.dumps({"files": sorted(s.files), "unreadable": dict(s.unreadable),
                  "complete": s.complete, "events": events}))
"""


def _without_read_override(args: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a command without root's power to read anything (CAP_DAC_*), if we are root."""
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root and util-linux setpriv is not installed")
        args = [setpriv, "--bounding-set=-dac_override,-dac_read_search", *args]
    return subprocess.run(args, capture_output=True, text=True, check=True, timeout=60)


def test_unreadable_files_and_folders_are_reported_and_make_the_scan_incomplete(
    tmp_path: Path,
) -> None:
    root = tmp_path
    (root / "ok.jpg").write_bytes(b"x")
    (root / "secret.jpg").write_bytes(b"x")
    (root / "secret.jpg").chmod(0o000)
    locked = root / "locked"
    locked.mkdir()
    (locked / "hidden.jpg").write_bytes(b"x")
    locked.chmod(0o000)
    try:
        out = _without_read_override([sys.executable, "-c", UNREADABLE_SCRIPT, str(root)])
    finally:
        locked.chmod(0o755)  # so that pytest can clean up
    got = json.loads(out.stdout)
    assert got["files"] == ["ok.jpg"]
    assert "secret.jpg" in got["unreadable"] and not got["complete"]
    errors = " ".join(str(f["error"]) for _, f in got["events"])
    assert "cannot list folder" in errors and "cannot read" in errors


def test_inodes_above_2_63_fit_the_ledger_one_to_one(tmp_path: Path) -> None:
    from featsync.ledger import SqlLedger
    from featsync.model import Action, Kind, LocalFile, Outcome
    from featsync.scan import signed_inode, stat_key

    huge = [(1 << 64) - 1, 1 << 63, (1 << 63) - 1, 12]
    signed = [signed_inode(i) for i in huge]
    assert signed == [-1, -(1 << 63), (1 << 63) - 1, 12]  # distinct, as the inodes are
    st = os.stat_result((0o100644, huge[0], 1, 1, 0, 0, 10, 0, 0, 0), {"st_mtime_ns": 5})
    assert stat_key(st, 1 << 62)[2] == -1
    ledger = SqlLedger(f"sqlite:///{tmp_path / 'ledger.db'}")  # a signed 64-bit column
    try:
        for n, ino in enumerate(signed):
            f = LocalFile(f"{n}.jpg", f"{n}.jpg", 10, 5, ino, "h")
            action = Action(Kind.ADD, f.image_id, f, 0)
            ledger.record(Outcome(action, Kind.ADD, "h", 10, 5, ino, 1, None, None, 1.0), 1.0, None)
        assert {k[3] for k in ledger.quick_keys()} == set(signed)
    finally:
        ledger.close()
