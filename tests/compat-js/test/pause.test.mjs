// Pause and resume through the JS SDK: pause(), getInfo().state, isRunning() while paused,
// Sandbox.connect() resumes with processes and memory intact, list by state, auto-pause on
// timeout with auto-resume by traffic.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { Sandbox } from 'e2b'
import { waitUntil, withSandbox } from '../lib/util.mjs'

const count = async (sbx) => Number((await sbx.commands.run('cat /tmp/count 2>/dev/null || echo 0')).stdout.trim() || 0)

test('pause, then connect resumes where it stopped', async () => {
  const tag = `pause-${Date.now()}`
  await withSandbox(Sandbox, { metadata: { tag }, timeoutMs: 120_000 }, async (sbx) => {
    // The counter's only state is a shell variable: it continues only if memory survived.
    await sbx.commands.run('i=0; while :; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.2; done', { background: true })
    await waitUntil(async () => (await count(sbx)) >= 5, 60_000, 'the counter to run')
    const before = await count(sbx)

    assert.equal(await sbx.pause(), true)
    assert.equal(await Sandbox.pause(sbx.sandboxId), false, 'a second pause is a 409: false')
    const info = await sbx.getInfo()
    assert.equal(info.state, 'paused')
    assert.deepEqual(info.lifecycle, { onTimeout: 'kill', autoResume: false })
    assert.equal(await sbx.isRunning(), false)
    const paused = await Sandbox.list({ query: { metadata: { tag }, state: ['paused'] } }).nextItems()
    assert.deepEqual(paused.map((s) => s.sandboxId), [sbx.sandboxId])
    assert.equal(paused[0].state, 'paused')
    const running = await Sandbox.list({ query: { metadata: { tag }, state: ['running'] } }).nextItems()
    assert.deepEqual(running, [])

    await new Promise((r) => setTimeout(r, 3000)) // 15 ticks if it were running

    const again = await Sandbox.connect(sbx.sandboxId, { timeoutMs: 120_000 })
    assert.equal(again.sandboxId, sbx.sandboxId)
    assert.equal((await sbx.getInfo()).state, 'running')
    const after = await count(again)
    assert.ok(after >= before, `the counter restarted (${before} -> ${after})`)
    assert.ok(after - before <= 10, `the counter advanced while paused (${before} -> ${after})`)
    await waitUntil(async () => (await count(sbx)) > after, 30_000, 'the counter to continue')
    assert.equal(await sbx.isRunning(), true)
  })
})

test('auto-pause on timeout, auto-resume on traffic', async () => {
  await withSandbox(Sandbox, { timeoutMs: 3_000, lifecycle: { onTimeout: 'pause', autoResume: true } }, async (sbx) => {
    await sbx.files.write('/home/user/kept.txt', 'kept')
    const info = await sbx.getInfo()
    assert.deepEqual(info.lifecycle, { onTimeout: 'pause', autoResume: true })
    await waitUntil(async () => (await sbx.getInfo()).state === 'paused', 30_000, 'auto-pause', 500)
    // traffic through the proxy resumes it
    assert.equal(await sbx.files.read('/home/user/kept.txt'), 'kept')
    assert.equal((await sbx.getInfo()).state, 'running')
  })
})

test('kill while paused', async () => {
  const sbx = await Sandbox.create('base', { timeoutMs: 60_000 })
  assert.equal(await sbx.pause(), true)
  assert.equal(await sbx.kill(), true)
  assert.equal(await Sandbox.kill(sbx.sandboxId), false)
  const list = await Sandbox.list({ query: { state: ['paused', 'running'] } }).nextItems()
  assert.ok(!list.some((s) => s.sandboxId === sbx.sandboxId))
})

test('pause({keepMemory: false}) keeps the files, connect cold-starts under the same ID', async () => {
  await withSandbox(Sandbox, { timeoutMs: 120_000 }, async (sbx) => {
    await sbx.files.write('/home/user/kept.txt', 'on disk\n')
    await sbx.commands.run('sleep 600', { background: true })
    assert.equal(await sbx.pause({ keepMemory: false }), true)
    assert.equal((await sbx.getInfo()).state, 'paused')
    assert.equal(await sbx.isRunning(), false)
    const again = await Sandbox.connect(sbx.sandboxId, { timeoutMs: 120_000 })
    assert.equal(again.sandboxId, sbx.sandboxId)
    // the handle from before the pause still works: same access token
    assert.equal(await sbx.files.read('/home/user/kept.txt'), 'on disk\n')
    const ps = await sbx.commands.run('ps -eo args')
    assert.ok(!ps.stdout.includes('sleep 600'), 'processes do not survive a filesystem pause')
  })
})
