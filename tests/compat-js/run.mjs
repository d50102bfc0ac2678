// Start one `cella serve`, point the official e2b JS SDK at it (E2B_API_KEY, E2B_API_URL,
// E2B_SANDBOX_URL) and run every test/*.test.mjs with node's test runner, one file at a time.
import { spawn } from 'node:child_process'
import { readdirSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { startServer } from './lib/server.mjs'

const here = dirname(fileURLToPath(import.meta.url))
const files = readdirSync(join(here, 'test'))
  .filter((f) => f.endsWith('.test.mjs'))
  .sort()
  .map((f) => join('test', f))

const srv = await startServer({ echo: (l) => process.stderr.write(`[cella serve] ${l}\n`) })
process.stderr.write(`[compat-js] server ${srv.url}; log ${srv.logPath}\n`)
const args = ['--test', '--test-concurrency=1', '--test-timeout=180000', ...process.argv.slice(2), ...files]
const child = spawn(process.execPath, args, {
  cwd: here,
  stdio: 'inherit',
  env: {
    ...process.env,
    E2B_API_KEY: srv.key,
    E2B_API_URL: srv.url,
    E2B_SANDBOX_URL: srv.url,
    CELLA_DATA_DIR: srv.dataDir,
  },
})
const stopOnSignal = () => child.kill('SIGTERM')
process.on('SIGINT', stopOnSignal)
process.on('SIGTERM', stopOnSignal)
const rc = await new Promise((res) => child.on('exit', (c, s) => res(c ?? (s ? 1 : 0))))
const code = await srv.stop({ keep: rc !== 0 })
process.stderr.write(`[compat-js] tests exit ${rc}; server exit ${code}\n`)
if (code !== 0) process.stderr.write(`[compat-js] cella serve exited with ${code} after SIGTERM; see ${srv.logPath}\n`)
process.exit(rc !== 0 ? rc : code === 0 ? 0 : 1)
