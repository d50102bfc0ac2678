// Small helpers shared by the JS compatibility tests.
import http from 'node:http'

export const API_URL = () => process.env.E2B_API_URL
export { newApiKey as newKey } from './server.mjs'
export const API_KEY = () => process.env.E2B_API_KEY

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

/** Poll `pred` until it returns a truthy value; throw after `timeoutMs`. */
export async function waitUntil(pred, timeoutMs, what = 'condition', intervalMs = 100) {
  const end = Date.now() + timeoutMs
  let last
  for (;;) {
    last = await pred()
    if (last) return last
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}: ${JSON.stringify(last)}`)
    await sleep(intervalMs)
  }
}

/** A REST call to the server with the suite's key (or `key`). */
export async function api(method, path, { body, key, headers = {} } = {}) {
  const r = await fetch(API_URL() + path, {
    method,
    headers: { 'X-API-Key': key ?? API_KEY(), 'Content-Type': 'application/json', ...headers },
    body: body === undefined ? undefined : JSON.stringify(body),
  })
  const text = await r.text()
  let json
  try {
    json = text ? JSON.parse(text) : undefined
  } catch {
    json = undefined
  }
  return { status: r.status, headers: r.headers, text, json }
}

/**
 * A raw HTTP/1.1 request through the server (node's fetch refuses to set Host), for proxy
 * tests: returns {status, headers, body (Buffer), chunks [{t, data}]}.
 */
export function rawRequest({ method = 'GET', path = '/', headers = {}, body } = {}) {
  const u = new URL(API_URL())
  return new Promise((resolve, reject) => {
    const req = http.request(
      { host: u.hostname, port: u.port, method, path, headers, setHost: !('Host' in headers || 'host' in headers) },
      (res) => {
        const chunks = []
        res.on('data', (d) => chunks.push({ t: Date.now(), data: d }))
        res.on('end', () =>
          resolve({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks.map((c) => c.data)), chunks }),
        )
        res.on('error', reject)
      },
    )
    req.on('error', reject)
    if (body !== undefined) req.write(body)
    req.end()
  })
}

/** Create a sandbox, run `fn`, always kill it. */
export async function withSandbox(Sandbox, opts, fn) {
  const sbx = await Sandbox.create('base', { timeoutMs: 300_000, ...opts })
  try {
    return await fn(sbx)
  } finally {
    await sbx.kill().catch(() => {})
  }
}

/** Start a background server inside the sandbox and wait until it answers on `port`. */
export async function startInSandbox(sbx, cmd, port) {
  const h = await sbx.commands.run(cmd, { background: true })
  await waitUntil(
    async () => (await sbx.commands.run(`bash -c '(echo > /dev/tcp/127.0.0.1/${port}) 2>/dev/null && echo up || echo down'`)).stdout.trim() === 'up',
    30_000,
    `port ${port} in the sandbox`,
    200,
  )
  return h
}
