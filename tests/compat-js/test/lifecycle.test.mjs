// Sandbox lifecycle through the JS SDK: create (v2), info, list (filters, pagination),
// connect, timeouts, metrics, kill, templates, auth failures and the clear 501s.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { Sandbox, Template, AuthenticationError, NotFoundError, SandboxError } from 'e2b'
import { api, newKey, waitUntil, withSandbox } from '../lib/util.mjs'

test('create reports the SandboxDetail fields and metadata', async () => {
  const started = Date.now()
  await withSandbox(Sandbox, { metadata: { suite: 'compat-js', case: 'info' }, timeoutMs: 120_000 }, async (sbx) => {
    assert.match(sbx.sandboxId, /^[a-z0-9]+$/)
    const info = await sbx.getInfo()
    assert.equal(info.sandboxId, sbx.sandboxId)
    assert.equal(info.templateId, 'base')
    assert.deepEqual(info.metadata, { suite: 'compat-js', case: 'info' })
    assert.equal(info.state, 'running')
    assert.ok(info.cpuCount >= 1)
    assert.ok(info.memoryMB >= 128)
    assert.ok(info.startedAt instanceof Date)
    assert.ok(Math.abs(info.startedAt.getTime() - started) < 60_000)
    // endAt = start + timeout
    const ttl = info.endAt.getTime() - info.startedAt.getTime()
    assert.ok(ttl > 110_000 && ttl <= 121_000, `ttl ${ttl}`)
    // The raw body also has diskSizeMB, which the SDK does not surface.
    const raw = await api('GET', `/sandboxes/${sbx.sandboxId}`)
    assert.equal(raw.status, 200)
    assert.ok(raw.json.diskSizeMB > 0)
    assert.equal(raw.json.envdVersion, info.envdVersion)
    assert.ok(await sbx.isRunning())
  })
})

test('list filters by metadata and state, pages with limit and nextToken', async () => {
  const tag = `page-${Date.now()}`
  const made = []
  try {
    for (let i = 0; i < 3; i++) made.push(await Sandbox.create('base', { metadata: { tag, i: String(i) }, timeoutMs: 120_000 }))
    const byMeta = await Sandbox.list({ query: { metadata: { tag } } }).nextItems()
    assert.deepEqual(byMeta.map((s) => s.sandboxId).sort(), made.map((s) => s.sandboxId).sort())
    const one = await Sandbox.list({ query: { metadata: { tag, i: '1' } } }).nextItems()
    assert.deepEqual(one.map((s) => s.sandboxId), [made[1].sandboxId])
    assert.equal(one[0].state, 'running')

    const paused = await Sandbox.list({ query: { metadata: { tag }, state: ['paused'] } }).nextItems()
    assert.deepEqual(paused, [])

    const pager = Sandbox.list({ query: { metadata: { tag }, state: ['running'] }, limit: 2 })
    const first = await pager.nextItems()
    assert.equal(first.length, 2)
    assert.equal(pager.hasNext, true)
    assert.ok(pager.nextToken)
    const second = await pager.nextItems()
    assert.equal(second.length, 1)
    assert.equal(pager.hasNext, false)
    const all = [...first, ...second].map((s) => s.sandboxId).sort()
    assert.deepEqual(all, made.map((s) => s.sandboxId).sort())
  } finally {
    await Promise.all(made.map((s) => s.kill().catch(() => {})))
  }
})

test('connect from a second client, by id and by instance', async () => {
  await withSandbox(Sandbox, { timeoutMs: 60_000 }, async (sbx) => {
    await sbx.files.write('/home/user/marker', 'from the first client')
    const other = await Sandbox.connect(sbx.sandboxId, { timeoutMs: 240_000 })
    assert.equal(other.sandboxId, sbx.sandboxId)
    assert.equal(await other.files.read('/home/user/marker'), 'from the first client')
    // connect only ever extends the lifetime
    const info = await other.getInfo()
    assert.ok(info.endAt.getTime() - Date.now() > 200_000)
    const again = await sbx.connect({ timeoutMs: 10_000 })
    assert.equal(again.sandboxId, sbx.sandboxId)
    const info2 = await sbx.getInfo()
    assert.ok(info2.endAt.getTime() - Date.now() > 200_000, 'connect must not shorten the timeout')
  })
})

test('connect to an unknown sandbox is a NotFoundError', async () => {
  await assert.rejects(Sandbox.connect('inosuchsandbox0000000'), NotFoundError)
})

test('setTimeout shortens and extends; expiry kills the sandbox', async () => {
  const sbx = await Sandbox.create('base', { timeoutMs: 120_000 })
  try {
    await sbx.setTimeout(300_000)
    let info = await sbx.getInfo()
    assert.ok(info.endAt.getTime() - Date.now() > 280_000)
    await Sandbox.setTimeout(sbx.sandboxId, 3_000)
    info = await sbx.getInfo()
    assert.ok(info.endAt.getTime() - Date.now() < 4_000)
    await waitUntil(async () => !(await sbx.isRunning()), 30_000, 'the sandbox to expire', 250)
    await assert.rejects(Sandbox.getInfo(sbx.sandboxId), NotFoundError)
  } finally {
    await sbx.kill().catch(() => {})
  }
})

test('refreshes extends the lifetime (REST)', async () => {
  await withSandbox(Sandbox, { timeoutMs: 20_000 }, async (sbx) => {
    const r = await api('POST', `/sandboxes/${sbx.sandboxId}/refreshes`, { body: { duration: 600 } })
    assert.equal(r.status, 204, r.text)
    const info = await sbx.getInfo()
    assert.ok(info.endAt.getTime() - Date.now() > 500_000)
    const bad = await api('POST', `/sandboxes/${sbx.sandboxId}/refreshes`, { body: { duration: 4000 } })
    assert.equal(bad.status, 400)
    assert.match(bad.json.message, /duration/)
  })
})

test('metrics: per sandbox through the SDK, many through REST', async () => {
  await withSandbox(Sandbox, {}, async (sbx) => {
    await sbx.commands.run('head -c 20000000 /dev/zero > /home/user/blob')
    const m = await waitUntil(async () => {
      const ms = await sbx.getMetrics()
      return ms.length > 0 && ms[ms.length - 1].diskUsed > 0 ? ms : null
    }, 30_000, 'disk metrics')
    const last = m[m.length - 1]
    assert.ok(last.timestamp instanceof Date)
    assert.ok(last.cpuCount >= 1)
    assert.ok(last.memTotal > 0 && last.memUsed > 0)
    assert.ok(last.diskTotal > 0 && last.diskUsed >= 20_000_000)
    const many = await api('GET', `/sandboxes/metrics?sandbox_ids=${sbx.sandboxId},inosuchsandbox`)
    assert.equal(many.status, 200)
    assert.deepEqual(Object.keys(many.json.sandboxes), [sbx.sandboxId])
    assert.ok(many.json.sandboxes[sbx.sandboxId].memTotal > 0)
  })
})

test('logs (REST v2) tell the sandbox story', async () => {
  await withSandbox(Sandbox, {}, async (sbx) => {
    await sbx.commands.run('echo logged')
    const r = await api('GET', `/v2/sandboxes/${sbx.sandboxId}/logs?limit=100`)
    assert.equal(r.status, 200)
    assert.ok(Array.isArray(r.json.logs))
    assert.ok(r.json.logs.length > 0)
    for (const e of r.json.logs) {
      assert.equal(typeof e.message, 'string')
      assert.ok(e.timestamp)
      assert.ok(e.level)
    }
  })
})

test('kill: instance and static, idempotent answers, isRunning afterwards', async () => {
  const a = await Sandbox.create('base', { timeoutMs: 60_000 })
  const b = await Sandbox.create('base', { timeoutMs: 60_000 })
  assert.equal(await a.kill(), true)
  assert.equal(await Sandbox.kill(b.sandboxId), true)
  assert.equal(await Sandbox.kill(b.sandboxId), false)
  assert.equal(await a.isRunning(), false)
  const listed = (await Sandbox.list().nextItems()).map((s) => s.sandboxId)
  assert.ok(!listed.includes(a.sandboxId) && !listed.includes(b.sandboxId))
})

test('a killed sandbox: commands fail with the SDK error for a gone sandbox', async () => {
  const sbx = await Sandbox.create('base', { timeoutMs: 60_000 })
  await sbx.kill()
  await assert.rejects(sbx.commands.run('echo hi'), (e) => {
    assert.ok(e instanceof SandboxError, `${e?.constructor?.name}: ${e?.message}`)
    assert.match(e.message, /not found|not running|timeout|was killed/i)
    return true
  })
})

test('a wrong API key is an AuthenticationError', async () => {
  await assert.rejects(Sandbox.create('base', { apiKey: newKey() }), AuthenticationError)
  await assert.rejects(Sandbox.list({ apiKey: newKey() }).nextItems(), AuthenticationError)
})

test('a second key cannot see or kill the first key\'s sandbox', async (t) => {
  const other = await makeSecondKey()
  if (!other) return t.skip('no second key (cella keys create unavailable)')
  await withSandbox(Sandbox, {}, async (sbx) => {
    const seen = (await Sandbox.list({ apiKey: other }).nextItems()).map((s) => s.sandboxId)
    assert.ok(!seen.includes(sbx.sandboxId))
    await assert.rejects(Sandbox.getInfo(sbx.sandboxId, { apiKey: other }), NotFoundError)
    assert.equal(await Sandbox.kill(sbx.sandboxId, { apiKey: other }), false)
    assert.ok(await sbx.isRunning())
  })
})

test('unknown template is a NotFoundError-like 404; templates and aliases resolve', async () => {
  await assert.rejects(Sandbox.create('no-such-template-xyz'), (e) => {
    assert.match(e.message, /404|not found/i)
    return true
  })
  assert.equal(await Template.exists('base'), true)
  assert.equal(await Template.exists('no-such-template-xyz'), false)
  const list = await api('GET', '/templates')
  assert.equal(list.status, 200)
  assert.ok(list.json.some((t) => t.aliases.includes('base') || t.templateID === 'base'))
})

test('unsupported features answer 501 with a reason', async () => {
  // (fork and snapshots are supported: test/snapshots.test.mjs)
  for (const [method, path] of [
    ['DELETE', '/templates/base'],
    ['GET', '/volumes'],
    ['GET', '/secrets'],
    ['POST', '/v3/templates'],
    ['POST', '/templates/tags'],
    ['DELETE', '/templates/tags'],
    ['GET', '/templates/base/tags'],
  ]) {
    const r = await api(method, path, { body: method === 'GET' ? undefined : {} })
    assert.equal(r.status, 501, `${method} ${path}: ${r.status} ${r.text}`)
    assert.match(r.json.message, /not supported/)
  }
})

async function makeSecondKey() {
  const { execFileSync } = await import('node:child_process')
  const { CELLA } = await import('../lib/server.mjs')
  try {
    const out = execFileSync(CELLA, ['keys', 'create', '--name', 'compat-js-second', '--data-dir', process.env.CELLA_DATA_DIR], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] })
    const m = /e2b_[0-9a-f]{40}/.exec(out)
    return m ? m[0] : null
  } catch {
    return null
  }
}

