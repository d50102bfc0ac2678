// The sandbox proxy through the JS SDK's addressing: a web server started in a sandbox is
// reachable by header routing (E2b-Sandbox-Id/-Port, what E2B_SANDBOX_URL clients send) and
// by host routing (`<port>-<id>.<domain>`, what `getHost()` returns); streaming and WebSocket
// pass-through; E2B's exact 502 bodies; internal envd routes refused; traffic access tokens.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { readFileSync } from 'node:fs'
import net from 'node:net'
import { randomBytes, createHash } from 'node:crypto'
import { Sandbox } from 'e2b'
import { API_URL, rawRequest, startInSandbox, withSandbox } from '../lib/util.mjs'

const WEB_PY = readFileSync(new URL('../fixtures/web.py', import.meta.url), 'utf8')

async function withWebServer(opts, fn) {
  return withSandbox(Sandbox, opts, async (sbx) => {
    await sbx.files.write('/home/user/web.py', WEB_PY)
    await startInSandbox(sbx, 'python3 /home/user/web.py 8080', 8080)
    return fn(sbx)
  })
}

test('a web server in the sandbox: header routing and <port>-<id>.<domain> host routing', async () => {
  await withWebServer({}, async (sbx) => {
    const byHeader = await rawRequest({
      path: '/hello?x=1',
      headers: { 'E2b-Sandbox-Id': sbx.sandboxId, 'E2b-Sandbox-Port': '8080' },
    })
    assert.equal(byHeader.status, 200)
    assert.match(byHeader.body.toString(), /^hello on 8080 .*method=GET path=\/hello\?x=1$/)

    const host = sbx.getHost(8080)
    assert.equal(host, `8080-${sbx.sandboxId}.e2b.app`)
    const byHost = await rawRequest({ path: '/hello', headers: { Host: host } })
    assert.equal(byHost.status, 200)
    assert.match(byHost.body.toString(), new RegExp(`^hello on 8080 host=${host.replace(/\./g, '\\.')} `))

    // POST bodies pass through too.
    const post = await rawRequest({
      method: 'POST',
      path: '/hello',
      headers: { Host: host, 'Content-Type': 'text/plain' },
      body: 'payload',
    })
    assert.match(post.body.toString(), /method=POST/)

    // The caller's API key never reaches the sandbox.
    const leak = await rawRequest({
      path: '/hello',
      headers: { Host: host, 'X-API-Key': process.env.E2B_API_KEY, 'e2b-traffic-access-token': 'x' },
    })
    assert.equal(leak.status, 200)
    assert.match(leak.body.toString(), / token= apikey= method=GET/)
  })
})

test('streaming responses pass through as they are produced', async () => {
  await withWebServer({}, async (sbx) => {
    const r = await rawRequest({ path: '/stream', headers: { Host: sbx.getHost(8080) } })
    assert.equal(r.status, 200)
    assert.equal(r.body.toString(), 'tick0\ntick1\ntick2\n')
    const first = r.chunks[0].t
    const last = r.chunks[r.chunks.length - 1].t
    assert.ok(last - first > 1500, `chunks arrived within ${last - first} ms: buffered, not streamed`)
  })
})

test('WebSocket upgrade passes through both ways', async () => {
  await withWebServer({}, async (sbx) => {
    const u = new URL(API_URL())
    const key = randomBytes(16).toString('base64')
    const sock = net.connect(Number(u.port), u.hostname)
    await new Promise((r, j) => sock.once('connect', r).once('error', j))
    sock.write(
      `GET /ws HTTP/1.1\r\nHost: ${sbx.getHost(8080)}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
        `Sec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n\r\n`,
    )
    let buf = Buffer.alloc(0)
    const read = (pred) =>
      new Promise((resolve, reject) => {
        const t = setTimeout(() => reject(new Error(`timeout; got ${JSON.stringify(buf.toString())}`)), 15_000)
        const check = () => {
          if (pred(buf.toString('latin1'))) {
            clearTimeout(t)
            sock.off('data', on)
            resolve(buf.toString('latin1'))
          }
        }
        const on = (d) => {
          buf = Buffer.concat([buf, d])
          check()
        }
        sock.on('data', on)
        check()
      })
    const head = await read((s) => s.includes('\r\n\r\n'))
    assert.match(head, /^HTTP\/1\.1 101 /)
    const accept = createHash('sha1').update(key + '258EAFA5-E914-47DA-95CA-C5AB0DC85B11').digest('base64')
    assert.match(head, new RegExp(`sec-websocket-accept: ${accept.replace(/[+/=]/g, (c) => '\\' + c)}`, 'i'))
    buf = Buffer.alloc(0)
    sock.write('ping over the tunnel')
    assert.equal(await read((s) => s.length >= 20), 'PING OVER THE TUNNEL')
    sock.destroy()
  })
})

test('E2B 502 bodies: sandbox not found, port not open; internal routes refused', async () => {
  const gone = await rawRequest({
    path: '/health',
    headers: { 'E2b-Sandbox-Id': 'inosuchsandbox0000000', Accept: 'application/json' },
  })
  assert.equal(gone.status, 502)
  assert.deepEqual(JSON.parse(gone.body), {
    sandboxId: 'inosuchsandbox0000000',
    message: 'The sandbox was not found',
    code: 502,
  })
  await withSandbox(Sandbox, {}, async (sbx) => {
    const closed = await rawRequest({ path: '/', headers: { Host: sbx.getHost(9999) } })
    assert.equal(closed.status, 502)
    assert.deepEqual(JSON.parse(closed.body), {
      sandboxId: sbx.sandboxId,
      message: 'The sandbox is running but port is not open',
      port: 9999,
      code: 502,
    })
    for (const path of ['/init', '/upgrade', '/freeze', '/unfreeze', '/collapse', '/fsfreeze', '/fsthaw', '/egress']) {
      const r = await rawRequest({ method: 'POST', path, headers: { 'E2b-Sandbox-Id': sbx.sandboxId } })
      assert.equal(r.status, 404, `${path} must be refused through the proxy`)
    }
    // envd itself stays reachable: /health needs no token.
    const h = await rawRequest({ path: '/health', headers: { Host: sbx.getHost(49983) } })
    assert.equal(h.status, 204)
  })
})

test('allowPublicTraffic=false: trafficAccessToken is required for sandbox ports', async () => {
  await withWebServer({ network: { allowPublicTraffic: false } }, async (sbx) => {
    assert.ok(sbx.trafficAccessToken, 'create must return a trafficAccessToken')
    const host = sbx.getHost(8080)
    const without = await rawRequest({ path: '/hello', headers: { Host: host } })
    assert.equal(without.status, 403)
    const wrong = await rawRequest({ path: '/hello', headers: { Host: host, 'e2b-traffic-access-token': 'nope' } })
    assert.equal(wrong.status, 403)
    const ok = await rawRequest({
      path: '/hello',
      headers: { Host: host, 'e2b-traffic-access-token': sbx.trafficAccessToken },
    })
    assert.equal(ok.status, 200)
    assert.match(ok.body.toString(), /^hello on 8080/)
    // envd's port keeps its own auth (the SDK works without the traffic token).
    assert.equal((await sbx.commands.run('echo envd-ok')).stdout, 'envd-ok\n')
    // Info reports the network setting.
    const info = await sbx.getInfo()
    assert.equal(info.network?.allowPublicTraffic, false)
  })
  // Public by default: no token issued, no header needed.
  await withWebServer({}, async (sbx) => {
    assert.equal(sbx.trafficAccessToken, undefined)
    const r = await rawRequest({ path: '/hello', headers: { Host: sbx.getHost(8080) } })
    assert.equal(r.status, 200)
  })
})
