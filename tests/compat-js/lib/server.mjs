// A `cella serve` process for the JS compatibility suite: free port, temporary data dir, a
// generated `e2b_<40 hex>` key, the shared template dir. Mirrors tests/e2e/cella_e2e.py so
// both SDKs meet the same server set-up.
import { spawn } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { createWriteStream, mkdtempSync, chmodSync, rmSync } from 'node:fs'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join, resolve, dirname } from 'node:path'
import { fileURLToPath } from 'node:url'

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..', '..')
export const CELLA = process.env.CELLA_BIN || join(ROOT, 'target', 'release', 'cella')
const TEMPLATE_DIR = process.env.CELLA_E2E_TEMPLATE_DIR || '/var/lib/cella/templates'
const START_DEADLINE_MS = Number(process.env.CELLA_E2E_START_DEADLINE || 20 * 60) * 1000

export function newApiKey() {
  return 'e2b_' + randomBytes(20).toString('hex')
}

function freePort() {
  return new Promise((res, rej) => {
    const s = createServer()
    s.unref()
    s.on('error', rej)
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address()
      s.close(() => res(port))
    })
  })
}

export async function startServer({ echo = () => {} } = {}) {
  const tmp = mkdtempSync(join(tmpdir(), 'cella-compat-js-'))
  // Sandbox users (mapped uids) must be able to traverse it.
  chmodSync(tmp, 0o711)
  const dataDir = join(tmp, 'data')
  const logPath = process.env.CELLA_E2E_LOG || join(tmp, 'server.log')
  const key = newApiKey()
  const port = await freePort()
  const url = `http://127.0.0.1:${port}`
  const args = ['serve', '--listen', `127.0.0.1:${port}`, '--data-dir', dataDir, '--template-dir', TEMPLATE_DIR]
  if (process.env.CELLA_E2E_DRIVER) args.push('--driver', process.env.CELLA_E2E_DRIVER)
  const log = createWriteStream(logPath, { flags: 'a' })
  const proc = spawn(CELLA, args, {
    env: { ...process.env, CELLA_API_KEY: key, RUST_LOG: process.env.RUST_LOG || 'info' },
    stdio: ['ignore', 'pipe', 'pipe'],
    detached: true, // own process group: a Ctrl-C reaches the runner, which stops the server
  })
  await new Promise((res, rej) => {
    let ready = false
    const timer = setTimeout(() => {
      proc.kill('SIGKILL')
      rej(new Error(`cella serve not ready within ${START_DEADLINE_MS} ms; see ${logPath}`))
    }, START_DEADLINE_MS)
    let buf = ''
    const onData = (chunk) => {
      log.write(chunk)
      buf += chunk.toString('utf8')
      let i
      while ((i = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, i)
        buf = buf.slice(i + 1)
        if (!ready) echo(line)
        const m = /cella listening on (http:\/\/\S+)/.exec(line)
        if (m && !ready) {
          ready = true
          clearTimeout(timer)
          if (m[1] !== url) rej(new Error(`server listens on ${m[1]}, expected ${url}`))
          else res()
        }
      }
    }
    proc.stdout.on('data', onData)
    proc.stderr.on('data', onData)
    proc.on('exit', (code) => {
      if (!ready) {
        clearTimeout(timer)
        rej(new Error(`cella serve exited with ${code} before it was ready; see ${logPath}`))
      }
    })
  })
  return {
    url,
    key,
    dataDir,
    logPath,
    /** SIGTERM, wait, return the exit code; remove the temp dir unless asked to keep it. */
    async stop({ keep = false } = {}) {
      const code = await new Promise((res) => {
        if (proc.exitCode !== null) return res(proc.exitCode)
        const t = setTimeout(() => proc.kill('SIGKILL'), 60_000)
        proc.on('exit', (c) => {
          clearTimeout(t)
          res(c)
        })
        proc.kill('SIGTERM')
      })
      log.end()
      if (!keep && !process.env.CELLA_E2E_KEEP) rmSync(tmp, { recursive: true, force: true })
      return code
    },
  }
}
