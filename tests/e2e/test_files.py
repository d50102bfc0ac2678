"""Filesystem API through the official SDK, including attempts to reach the host's files."""

import os
import time

import pytest
from e2b import FileType, FilesystemEventType, NotFoundException


def test_write_and_read_text_and_bytes(sandbox):
    info = sandbox.files.write("/home/user/hello.txt", "héllo wörld\n")
    assert info.path == "/home/user/hello.txt"
    assert info.name == "hello.txt"
    assert sandbox.files.read("/home/user/hello.txt") == "héllo wörld\n"
    # The file is really there for processes, owned by the user who wrote it.
    assert sandbox.commands.run("cat /home/user/hello.txt").stdout == "héllo wörld\n"
    assert sandbox.commands.run("stat -c %U /home/user/hello.txt").stdout == "user\n"

    blob = bytes(range(256)) * 4096 + os.urandom(12345)  # ~1 MiB, every byte value
    sandbox.files.write("/home/user/blob.bin", blob)
    assert sandbox.files.read("/home/user/blob.bin", format="bytes") == blob
    sha = sandbox.commands.run("sha256sum /home/user/blob.bin").stdout.split()[0]
    import hashlib

    assert sha == hashlib.sha256(blob).hexdigest()

    # Relative paths resolve against the user's home; parents are created.
    sandbox.files.write("nested/dir/rel.txt", "rel")
    assert sandbox.files.read("/home/user/nested/dir/rel.txt") == "rel"

    # Overwrite truncates.
    sandbox.files.write("/home/user/hello.txt", "x")
    assert sandbox.files.read("/home/user/hello.txt") == "x"

    with pytest.raises(NotFoundException):
        sandbox.files.read("/home/user/does-not-exist")


def test_list_exists_get_info_make_dir_rename_remove(sandbox):
    assert sandbox.files.make_dir("/home/user/d") is True
    assert sandbox.files.make_dir("/home/user/d") is False  # already exists
    sandbox.files.write("/home/user/d/a.txt", "aaa")
    sandbox.files.make_dir("/home/user/d/sub")

    entries = {e.name: e for e in sandbox.files.list("/home/user/d")}
    assert set(entries) == {"a.txt", "sub"}
    assert entries["a.txt"].type == FileType.FILE
    assert entries["a.txt"].size == 3
    assert entries["a.txt"].path == "/home/user/d/a.txt"
    assert entries["sub"].type == FileType.DIR

    assert sandbox.files.exists("/home/user/d/a.txt")
    assert not sandbox.files.exists("/home/user/d/nope")

    info = sandbox.files.get_info("/home/user/d/a.txt")
    assert info.name == "a.txt"
    assert info.size == 3
    assert info.owner == "user"
    assert info.type == FileType.FILE
    assert info.permissions.startswith("-rw")

    moved = sandbox.files.rename("/home/user/d/a.txt", "/home/user/d/sub/b.txt")
    assert moved.path == "/home/user/d/sub/b.txt"
    assert not sandbox.files.exists("/home/user/d/a.txt")
    assert sandbox.files.read("/home/user/d/sub/b.txt") == "aaa"

    sandbox.files.remove("/home/user/d")
    assert not sandbox.files.exists("/home/user/d")
    assert sandbox.commands.run("test -e /home/user/d || echo gone").stdout == "gone\n"


def test_watch_dir_reports_later_writes(sandbox):
    sandbox.files.make_dir("/home/user/watched")
    handle = sandbox.files.watch_dir("/home/user/watched")
    try:
        sandbox.files.write("/home/user/watched/new.txt", "data")
        sandbox.commands.run("echo more >> /home/user/watched/new.txt; rm /home/user/watched/new.txt")
        seen = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            seen += handle.get_new_events()
            types = {(e.name, e.type) for e in seen}
            if ("new.txt", FilesystemEventType.REMOVE) in types:
                break
            time.sleep(0.2)
        types = [(e.name, e.type) for e in seen]
        assert ("new.txt", FilesystemEventType.CREATE) in types, types
        assert ("new.txt", FilesystemEventType.WRITE) in types, types
        assert ("new.txt", FilesystemEventType.REMOVE) in types, types
        # CREATE comes before REMOVE.
        assert types.index(("new.txt", FilesystemEventType.CREATE)) < types.index(
            ("new.txt", FilesystemEventType.REMOVE)
        )
    finally:
        handle.stop()


def test_path_escape_stays_inside_the_sandbox(sandbox):
    marker = f"sandbox-{sandbox.sandbox_id}"
    sandbox.commands.run(f"echo {marker} > /etc/hostname", user="root")
    # ".." from the home directory cannot climb out of the sandbox's root.
    got = sandbox.files.read("../../../../etc/hostname", user="root")
    assert got == marker + "\n"
    got = sandbox.files.read("/home/user/../../../../../../etc/hostname", user="root")
    assert got == marker + "\n"
    with open("/etc/hostname") as f:
        assert marker not in f.read()
    # Writes through ".." land inside too.
    sandbox.files.write("../../../../tmp/escape-test", "inside", user="root")
    assert sandbox.commands.run("cat /tmp/escape-test").stdout == "inside"
    assert not os.path.exists("/tmp/escape-test")


def test_symlink_to_etc_shadow_reads_the_sandbox_file(sandbox):
    marker = f"e2emarker{sandbox.sandbox_id}"
    sandbox.commands.run(f"echo '{marker}:!:19000::::::' >> /etc/shadow", user="root")
    sandbox.commands.run("ln -s /etc/shadow /home/user/shadow-link")
    sandbox.commands.run("ln -s ../../../../../etc/shadow /home/user/shadow-rel")

    inside = sandbox.commands.run("cat /etc/shadow", user="root").stdout
    for link in ("/home/user/shadow-link", "/home/user/shadow-rel"):
        got = sandbox.files.read(link, user="root")
        assert got == inside
        assert marker in got
    with open("/etc/shadow") as f:
        assert marker not in f.read()

    # Writing through a symlink never reaches the host either.
    sandbox.commands.run("ln -s /etc/e2e-through-link /home/user/out-link")
    try:
        sandbox.files.write("/home/user/out-link", "nope", user="root")
    except Exception:
        pass
    assert not os.path.exists("/etc/e2e-through-link")
