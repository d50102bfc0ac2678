// Filesystem through the JS SDK: read/write in every format, gzip both ways, metadata,
// multi-file upload, list/exists/getInfo/makeDir/rename/remove, errors (file not found,
// listing a file), watch events (CREATE, WRITE, REMOVE, RENAME, CHMOD; recursive), and signed
// upload/download URLs with expirations.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { Sandbox, FileType, FilesystemEventType, NotFoundError, InvalidArgumentError, SandboxError } from 'e2b'
import { sleep, waitUntil, withSandbox } from '../lib/util.mjs'

test('write and read: text, bytes, blob, stream; gzip both ways; metadata', async () => {
  await withSandbox(Sandbox, {}, async (sbx) => {
    const info = await sbx.files.write('/home/user/t.txt', 'hello ✓')
    assert.equal(info.path, '/home/user/t.txt')
    assert.equal(info.name, 't.txt')
    assert.equal(await sbx.files.read('/home/user/t.txt'), 'hello ✓')

    const bytes = new Uint8Array(256).map((_, i) => i)
    await sbx.files.write('/home/user/b.bin', bytes.buffer)
    assert.deepEqual(new Uint8Array(await sbx.files.read('/home/user/b.bin', { format: 'bytes' })), bytes)
    const blob = await sbx.files.read('/home/user/b.bin', { format: 'blob' })
    assert.equal(blob.size, 256)
    const stream = await sbx.files.read('/home/user/t.txt', { format: 'stream' })
    const chunks = []
    for await (const c of stream) chunks.push(Buffer.from(c))
    assert.equal(Buffer.concat(chunks).toString(), 'hello ✓')

    // Relative paths resolve against the user's home.
    await sbx.files.write('rel.txt', 'relative')
    assert.equal((await sbx.commands.run('cat /home/user/rel.txt')).stdout, 'relative')

    // A streamed upload uses application/octet-stream; gzip compresses it.
    const big = 'x'.repeat(300_000) + 'end'
    const body = new ReadableStream({
      start(c) {
        c.enqueue(new TextEncoder().encode(big))
        c.close()
      },
    })
    await sbx.files.write('/home/user/gz.txt', body, { gzip: true })
    assert.equal((await sbx.commands.run('wc -c < /home/user/gz.txt')).stdout.trim(), String(big.length))
    assert.equal(await sbx.files.read('/home/user/gz.txt', { gzip: true }), big)

    // Metadata becomes extended attributes; keys are lowercased.
    await sbx.files.write('/home/user/meta.txt', 'm', { metadata: { Owner: 'compat', n: '1' } })
    const meta = await sbx.files.getInfo('/home/user/meta.txt')
    assert.deepEqual(meta.metadata, { owner: 'compat', n: '1' })

    // Several files in one upload; parent directories are created.
    const many = await sbx.files.write([
      { path: '/home/user/multi/a.txt', data: 'A' },
      { path: '/home/user/multi/deep/b.txt', data: 'B' },
    ])
    assert.deepEqual(many.map((w) => w.path).sort(), ['/home/user/multi/a.txt', '/home/user/multi/deep/b.txt'])
    assert.equal(await sbx.files.read('/home/user/multi/deep/b.txt'), 'B')
  })
})

test('list, exists, getInfo, makeDir, rename, remove', async () => {
  await withSandbox(Sandbox, {}, async (sbx) => {
    assert.equal(await sbx.files.makeDir('/home/user/d/e'), true)
    assert.equal(await sbx.files.makeDir('/home/user/d/e'), false)
    await sbx.files.write('/home/user/d/e/f.txt', 'f')
    await sbx.commands.run('ln -s /home/user/d/e/f.txt /home/user/d/link')
    const top = await sbx.files.list('/home/user/d')
    assert.deepEqual(top.map((e) => e.name).sort(), ['e', 'link'])
    assert.equal(top.find((e) => e.name === 'e').type, FileType.DIR)
    const link = top.find((e) => e.name === 'link')
    assert.equal(link.symlinkTarget, '/home/user/d/e/f.txt')
    const deep = await sbx.files.list('/home/user/d', { depth: 2 })
    assert.ok(deep.some((e) => e.path === '/home/user/d/e/f.txt' && e.type === FileType.FILE && e.size === 1))

    const st = await sbx.files.getInfo('/home/user/d/e/f.txt')
    assert.equal(st.type, FileType.FILE)
    assert.equal(st.owner, 'user')
    assert.equal(st.permissions, '-rw-r--r--')
    assert.ok(st.modifiedTime instanceof Date)

    assert.equal(await sbx.files.exists('/home/user/d/e/f.txt'), true)
    const moved = await sbx.files.rename('/home/user/d/e/f.txt', '/home/user/d/g.txt')
    assert.equal(moved.path, '/home/user/d/g.txt')
    assert.equal(await sbx.files.exists('/home/user/d/e/f.txt'), false)
    await sbx.files.remove('/home/user/d')
    assert.equal(await sbx.files.exists('/home/user/d'), false)
  })
})

test('errors: file not found, listing a file, reading a directory', async () => {
  await withSandbox(Sandbox, {}, async (sbx) => {
    await assert.rejects(sbx.files.read('/home/user/nope.txt'), NotFoundError)
    await assert.rejects(sbx.files.getInfo('/home/user/nope.txt'), NotFoundError)
    await assert.rejects(sbx.files.list('/home/user/nope'), NotFoundError)
    await assert.rejects(sbx.files.rename('/home/user/nope', '/home/user/x'), NotFoundError)
    await sbx.files.write('/home/user/plain.txt', 'p')
    await assert.rejects(sbx.files.list('/home/user/plain.txt'), (e) => {
      assert.ok(e instanceof InvalidArgumentError, `${e?.constructor?.name}: ${e?.message}`)
      assert.match(e.message, /not a directory/)
      return true
    })
    await assert.rejects(sbx.files.read('/home/user'), (e) => {
      assert.ok(e instanceof SandboxError || e instanceof InvalidArgumentError, `${e?.constructor?.name}`)
      return true
    })
  })
})

test('watchDir: CREATE, WRITE, CHMOD, RENAME, REMOVE; recursive; entry info', async () => {
  await withSandbox(Sandbox, {}, async (sbx) => {
    await sbx.files.makeDir('/home/user/w/sub')
    const events = []
    const handle = await sbx.files.watchDir('/home/user/w', (e) => events.push(e), {
      recursive: true,
      includeEntry: true,
      timeoutMs: 0,
    })
    try {
      await sbx.files.write('/home/user/w/a.txt', 'one')
      await sbx.commands.run('echo more >> /home/user/w/a.txt; chmod 600 /home/user/w/a.txt')
      await sbx.commands.run('mv /home/user/w/a.txt /home/user/w/b.txt; rm /home/user/w/b.txt')
      await sbx.files.write('/home/user/w/sub/deep.txt', 'deep')
      const has = (type, name) => events.some((e) => e.type === type && e.name === name)
      await waitUntil(
        () =>
          has(FilesystemEventType.CREATE, 'a.txt') &&
          has(FilesystemEventType.WRITE, 'a.txt') &&
          has(FilesystemEventType.CHMOD, 'a.txt') &&
          has(FilesystemEventType.RENAME, 'a.txt') &&
          has(FilesystemEventType.REMOVE, 'b.txt') &&
          has(FilesystemEventType.CREATE, 'sub/deep.txt'),
        15_000,
        'all event types',
      )
      const created = events.find((e) => e.type === FilesystemEventType.CREATE && e.name === 'sub/deep.txt')
      assert.equal(created.entry?.path, '/home/user/w/sub/deep.txt')
    } finally {
      await handle.stop()
    }
    // A non-recursive watch does not see the subdirectory.
    const flat = []
    const h2 = await sbx.files.watchDir('/home/user/w', (e) => flat.push(e), { timeoutMs: 0 })
    await sbx.files.write('/home/user/w/sub/ignored.txt', 'x')
    await sbx.files.write('/home/user/w/top.txt', 'x')
    await waitUntil(() => flat.some((e) => e.name === 'top.txt'), 10_000, 'top-level event')
    await sleep(300)
    await h2.stop()
    assert.ok(!flat.some((e) => e.name.includes('ignored')), JSON.stringify(flat))
    await assert.rejects(sbx.files.watchDir('/home/user/nope', () => {}), NotFoundError)
  })
})

test('signed upload and download URLs, with and without expiration', async () => {
  await withSandbox(Sandbox, { secure: true }, async (sbx) => {
    await sbx.files.write('/home/user/signed.txt', 'signed content')
    const url = await sbx.downloadUrl('/home/user/signed.txt')
    assert.match(url, /signature=v1_/)
    // A signed URL needs no token header; it still needs routing to the sandbox.
    const routed = { 'E2b-Sandbox-Id': sbx.sandboxId }
    const r = await fetch(url, { headers: routed })
    assert.equal(r.status, 200)
    assert.equal(await r.text(), 'signed content')

    const tampered = url.replace('signed.txt', 'other.txt')
    assert.equal((await fetch(tampered, { headers: routed })).status, 401)
    const unsigned = url.split('?')[0] + '?path=/home/user/signed.txt'
    assert.equal((await fetch(unsigned, { headers: routed })).status, 401)

    const up = await sbx.uploadUrl('/home/user/uploaded.txt', { useSignatureExpiration: 60 })
    assert.match(up, /signature_expiration=\d+/)
    const form = new FormData()
    form.append('file', new Blob(['via url']), 'uploaded.txt')
    const ur = await fetch(up, { method: 'POST', body: form, headers: routed })
    assert.equal(ur.status, 200, await ur.clone().text())
    assert.equal(await sbx.files.read('/home/user/uploaded.txt'), 'via url')

    // An expired signature is refused.
    // (useSignatureExpiration is in seconds.)
    const expired = await sbx.downloadUrl('/home/user/signed.txt', { useSignatureExpiration: 1 })
    await sleep(2500)
    assert.equal((await fetch(expired, { headers: routed })).status, 401)
  })
})
