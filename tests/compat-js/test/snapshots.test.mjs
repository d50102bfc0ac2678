// Snapshots and fork through the JS SDK: createSnapshot() keeps the sandbox's files (cella
// snapshots are filesystem-only: new sandboxes cold-start), Sandbox.create(snapshotId) starts
// from it, listSnapshots()/deleteSnapshot() behave as the SDK expects, fork() gives copies
// that diverge, and unknown sandboxes are SandboxNotFoundError.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { Sandbox, SandboxNotFoundError } from 'e2b'
import { withSandbox } from '../lib/util.mjs'

const all = async (paginator) => {
  const out = []
  while (paginator.hasNext) out.push(...(await paginator.nextItems()))
  return out
}

test('a snapshot starts sandboxes with the source files', async () => {
  const name = `js-snap-${Date.now()}`
  await withSandbox(Sandbox, {}, async (src) => {
    await src.files.write('/home/user/data.txt', 'from the source\n')
    await src.commands.run('rm /etc/motd', { user: 'root' })
    const snap = await src.createSnapshot({ name })
    assert.equal(snap.snapshotId, `${name}:default`)
    assert.deepEqual(snap.names, [`${name}:default`])
    assert.equal(await src.isRunning(), true)
    await src.files.write('/home/user/data.txt', 'after\n')
    try {
      const listed = await all(src.listSnapshots())
      assert.deepEqual(listed.map((s) => s.snapshotId), [snap.snapshotId])
      const byName = await all(Sandbox.listSnapshots({ name }))
      assert.deepEqual(byName.map((s) => s.snapshotId), [snap.snapshotId])

      const copy = await Sandbox.create(snap.snapshotId, { timeoutMs: 120_000 })
      try {
        assert.equal(await copy.files.read('/home/user/data.txt'), 'from the source\n')
        assert.equal(await copy.files.exists('/etc/motd'), false)
        await copy.files.write('/home/user/own.txt', 'x')
        assert.equal(await src.files.exists('/home/user/own.txt'), false)
      } finally {
        await copy.kill()
      }
    } finally {
      assert.equal(await Sandbox.deleteSnapshot(snap.snapshotId), true)
    }
    assert.equal(await Sandbox.deleteSnapshot(snap.snapshotId), false)
    await assert.rejects(Sandbox.create(snap.snapshotId, { timeoutMs: 60_000 }), /not found/i)
    await assert.rejects(Sandbox.createSnapshot('inosuchsandbox0000000'), SandboxNotFoundError)
  })
})

test('fork gives copies that diverge', async () => {
  await withSandbox(Sandbox, { metadata: { role: 'src' } }, async (src) => {
    await src.files.write('/home/user/state.txt', 'before\n')
    const forks = await src.fork({ count: 2, timeoutMs: 120_000 })
    try {
      assert.equal(forks.length, 2)
      for (const f of forks) {
        assert.ok(f instanceof Sandbox, String(f))
        assert.notEqual(f.sandboxId, src.sandboxId)
        assert.equal(await f.files.read('/home/user/state.txt'), 'before\n')
        assert.deepEqual((await f.getInfo()).metadata, { role: 'src' })
      }
      await forks[0].files.write('/home/user/state.txt', 'a\n')
      assert.equal(await forks[1].files.read('/home/user/state.txt'), 'before\n')
      assert.equal(await src.files.read('/home/user/state.txt'), 'before\n')
      assert.deepEqual(await all(src.listSnapshots()), [], 'a fork snapshot is never listed')
    } finally {
      for (const f of forks) if (f instanceof Sandbox) await f.kill().catch(() => {})
    }
    await assert.rejects(Sandbox.fork('inosuchsandbox0000000'), SandboxNotFoundError)
  })
})
