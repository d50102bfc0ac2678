// Commands and PTYs through the JS SDK: output, exit codes, streaming, env (per sandbox and per
// command), cwd, users, stdin, background processes, connecting from a second client, kill,
// timeouts, and a sandbox killed while a command runs.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { Sandbox, CommandExitError, TimeoutError, SandboxError } from 'e2b'
import { sleep, waitUntil, withSandbox } from '../lib/util.mjs'

test('run: stdout, stderr, exit codes', async () => {
  await withSandbox(Sandbox, {}, async (sbx) => {
    const r = await sbx.commands.run('echo out; echo err >&2')
    assert.equal(r.exitCode, 0)
    assert.equal(r.stdout, 'out\n')
    assert.equal(r.stderr, 'err\n')
    await assert.rejects(sbx.commands.run('echo partial; exit 7'), (e) => {
      assert.ok(e instanceof CommandExitError)
      assert.equal(e.exitCode, 7)
      assert.equal(e.stdout, 'partial\n')
      return true
    })
  })
})

test('streaming callbacks get output while the command runs', async () => {
  await withSandbox(Sandbox, {}, async (sbx) => {
    const seen = []
    const r = await sbx.commands.run('for i in 1 2 3; do echo line$i; sleep 1; done', {
      onStdout: (d) => seen.push({ t: Date.now(), d }),
    })
    const end = Date.now()
    assert.equal(seen.map((s) => s.d).join(''), 'line1\nline2\nline3\n')
    assert.equal(r.stdout, 'line1\nline2\nline3\n')
    assert.ok(end - seen[0].t > 1500, 'the first line must arrive before the command ends')
  })
})

test('env vars: per sandbox, per command, not leaking between commands', async () => {
  await withSandbox(Sandbox, { envs: { SBX: 'sandbox', BOTH: 'sandbox' } }, async (sbx) => {
    assert.equal((await sbx.commands.run('echo $SBX')).stdout, 'sandbox\n')
    const r = await sbx.commands.run('echo "$SBX $CMD $BOTH"', { envs: { CMD: 'command', BOTH: 'command' } })
    assert.equal(r.stdout, 'sandbox command command\n')
    assert.equal((await sbx.commands.run('echo "$BOTH ${CMD:-unset}"')).stdout, 'sandbox unset\n')
  })
})

test('cwd and users (Authorization: Basic)', async () => {
  await withSandbox(Sandbox, {}, async (sbx) => {
    assert.equal((await sbx.commands.run('pwd')).stdout, '/home/user\n')
    assert.equal((await sbx.commands.run('pwd', { cwd: '/tmp' })).stdout, '/tmp\n')
    assert.equal((await sbx.commands.run('whoami')).stdout, 'user\n')
    assert.equal((await sbx.commands.run('whoami; pwd', { user: 'root' })).stdout, 'root\n/root\n')
    await assert.rejects(sbx.commands.run('pwd', { cwd: '/no/such/dir' }))
    // Files written as root belong to root; as the default user, to user.
    await sbx.files.write('/tmp/by-root', 'x', { user: 'root' })
    assert.equal((await sbx.files.getInfo('/tmp/by-root')).owner, 'root')
  })
})

test('background command: stdin, list, connect from a second client, kill', async () => {
  await withSandbox(Sandbox, {}, async (sbx) => {
    const h = await sbx.commands.run('cat', { background: true, stdin: true })
    assert.ok(h.pid > 0)
    const procs = await sbx.commands.list()
    const mine = procs.find((p) => p.pid === h.pid)
    assert.ok(mine, JSON.stringify(procs))
    assert.equal(mine.cmd, '/bin/bash')

    // A second client connects to the running process and sees later output.
    const other = await Sandbox.connect(sbx.sandboxId)
    const got = []
    const h2 = await other.commands.connect(h.pid, { onStdout: (d) => got.push(d) })
    await sbx.commands.sendStdin(h.pid, 'hello from stdin\n')
    await waitUntil(() => got.join('').includes('hello from stdin'), 10_000, 'echo via the second client')
    await h.closeStdin()
    const res = await h.wait()
    assert.equal(res.exitCode, 0)
    assert.equal(res.stdout, 'hello from stdin\n')
    const res2 = await h2.wait()
    assert.equal(res2.exitCode, 0)

    const sleeper = await sbx.commands.run('sleep 600', { background: true })
    assert.equal(await sbx.commands.kill(sleeper.pid), true)
    await assert.rejects(sleeper.wait(), (e) => {
      assert.ok(e instanceof CommandExitError)
      assert.notEqual(e.exitCode, 0)
      return true
    })
    assert.equal(await sbx.commands.kill(sleeper.pid), false)
    assert.ok(!(await sbx.commands.list()).some((p) => p.pid === sleeper.pid))
  })
})

test('command timeout: the SDK raises TimeoutError and the sandbox stays usable', async () => {
  await withSandbox(Sandbox, {}, async (sbx) => {
    const t0 = Date.now()
    await assert.rejects(sbx.commands.run('sleep 30; echo never', { timeoutMs: 2000 }), (e) => {
      assert.ok(e instanceof TimeoutError, `${e?.constructor?.name}: ${e?.message}`)
      return true
    })
    assert.ok(Date.now() - t0 < 20_000)
    // Still usable afterwards.
    assert.equal((await sbx.commands.run('echo alive')).stdout, 'alive\n')
  })
})

test('sandbox killed mid-command: the running command fails instead of hanging', async () => {
  const sbx = await Sandbox.create('base', { timeoutMs: 120_000 })
  try {
    const h = await sbx.commands.run('echo started; sleep 120', { background: true })
    await sleep(500)
    await Sandbox.kill(sbx.sandboxId)
    const t0 = Date.now()
    await assert.rejects(h.wait(), (e) => {
      assert.ok(e instanceof Error)
      return true
    })
    assert.ok(Date.now() - t0 < 30_000, 'wait() must fail promptly after the kill')
    await assert.rejects(sbx.commands.run('echo hi'), SandboxError)
  } finally {
    await sbx.kill().catch(() => {})
  }
})

test('pty: output, input, resize, kill', async () => {
  await withSandbox(Sandbox, {}, async (sbx) => {
    const out = []
    const dec = new TextDecoder()
    const term = await sbx.pty.create({ cols: 80, rows: 24, onData: (d) => out.push(dec.decode(d)) })
    await sbx.pty.sendInput(term.pid, new TextEncoder().encode('echo $((6*7)); stty size\n'))
    await waitUntil(() => out.join('').includes('42') && out.join('').includes('24 80'), 15_000, 'pty output')
    await sbx.pty.resize(term.pid, { cols: 100, rows: 30 })
    await sbx.pty.sendInput(term.pid, new TextEncoder().encode('stty size\n'))
    await waitUntil(() => out.join('').includes('30 100'), 15_000, 'resized pty')
    assert.equal(await sbx.pty.kill(term.pid), true)
    await assert.rejects(term.wait())
  })
})
