/**
 * `pcache serve` with an NBD export as its backing device: the interop checks through the chain
 * client -> pcache -> nbdkit / qemu-nbd, a slow (delay filter) backing, and backing servers that
 * break the handshake. A test skips only when a Debian tool it needs is missing.
 */
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { open, readFile, writeFile } from 'node:fs/promises';
import net from 'node:net';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import { encodeGreeting, NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_NO_ZEROES } from '../../src/nbd/protocol.js';
import { runPcache, runPcacheInProcess } from '../helpers/cli.js';
import { startNbdkit, startQemuNbd, type ServerProc } from '../helpers/nbd-servers.js';
import { sparseFile, startServe } from '../helpers/serve.js';
import { tempDir } from '../helpers/tmp.js';
import { haveTool, havePythonNbd, run, runPython } from '../nbd/helpers.js';

const MiB = 1024 * 1024;

function sha(buf: Buffer): string {
  return createHash('sha256').update(buf).digest('hex');
}

async function needTools(t: TestContext, ...tools: string[]): Promise<boolean> {
  for (const tool of tools) {
    if (!(await haveTool(tool))) {
      t.skip(`${tool} is not installed`);
      return false;
    }
  }
  return true;
}

async function pokeFile(path: string, data: Buffer, offset: number): Promise<void> {
  const fh = await open(path, 'r+');
  try {
    await fh.write(data, 0, data.length, offset);
  } finally {
    await fh.close();
  }
}

/**
 * The interop checks through client -> pcache -> backing server, then `pcache flush` and the
 * backing file itself compared with what was written.
 */
async function chain(t: TestContext, kind: 'nbdkit' | 'qemu-nbd'): Promise<void> {
  if (!(await needTools(t, kind, 'qemu-io', 'nbdcopy'))) return;
  const size = 64 * MiB;
  const dir = await tempDir();
  const cache = await sparseFile(join(dir, 'cache.img'), 512 * MiB);
  const disk = await sparseFile(join(dir, 'disk.img'), size);
  // Data only the backing has: reading it through pcache is a miss served over NBD.
  await pokeFile(disk, Buffer.alloc(MiB, 0x77), 8 * MiB);
  const backend: ServerProc = kind === 'nbdkit' ? await startNbdkit(dir, ['file', disk]) : await startQemuNbd(dir, disk);
  t.after(() => backend.stop());
  const srv = await startServe(dir, cache, backend.uri);
  try {
    const tl = await runPcacheInProcess(['table', cache]);
    assert.equal(tl.code, 0, tl.stderr);
    assert.ok(tl.stdout.includes(` ${cache} ${backend.uri} 4 cache_mode writeback `), tl.stdout);
    const last = size - 512;
    const cmds = [
      'read -P 0x77 8M 1M',
      'read -P 0 0 64k',
      'write -P 0xab 0 64k',
      'write -P 0xcd 1M 1M',
      `write -P 0xef ${last} 512`,
      'write -P 0x11 8M 4k',
      'flush',
      'read -P 0xab 0 64k',
      'read -P 0xcd 1M 1M',
      `read -P 0xef ${last} 512`,
      'read -P 0x11 8M 4k',
      'read -P 0x77 8196k 1020k',
    ];
    const r = await run('qemu-io', ['-f', 'raw', ...cmds.flatMap((c) => ['-c', c]), srv.uri]);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    assert.doesNotMatch(r.stdout + r.stderr, /Pattern verification failed|error/i);
    assert.equal(r.stdout.match(/^read /gm)?.length, 7, r.stdout);
    const fl1 = await runPcacheInProcess(['flush', cache]);
    assert.equal(fl1.code, 0, fl1.stderr);
    const early = await readFile(disk);
    assert.ok(early.subarray(0, 64 * 1024).every((b) => b === 0xab));
    assert.ok(early.subarray(MiB, 2 * MiB).every((b) => b === 0xcd));
    assert.ok(early.subarray(last).every((b) => b === 0xef));
    assert.ok(early.subarray(8 * MiB, 8 * MiB + 4096).every((b) => b === 0x11));
    assert.ok(early.subarray(8 * MiB + 4096, 9 * MiB).every((b) => b === 0x77));

    // nbdcopy of a 64 MiB random file in and out.
    const src = randomBytes(size);
    await writeFile(join(dir, 'src.bin'), src);
    const cin = await run('nbdcopy', [join(dir, 'src.bin'), srv.uri], { timeoutMs: 60_000 });
    assert.equal(cin.code, 0, cin.stderr);
    const cout = await run('nbdcopy', [srv.uri, join(dir, 'out.bin')], { timeoutMs: 60_000 });
    assert.equal(cout.code, 0, cout.stderr);
    assert.equal(sha(await readFile(join(dir, 'out.bin'))), sha(src));
    const fl = await runPcache(['flush', cache], { timeoutMs: 60_000 });
    assert.equal(fl.code, 0, fl.stderr);
    // The backing file, read directly from disk with the backing server still running.
    assert.equal(sha(await readFile(disk)), sha(src));
    const st = await runPcacheInProcess(['stats', cache, '--json']);
    const backing = JSON.parse(st.stdout).backing;
    assert.equal(backing.kind, 'nbd');
    assert.equal(backing.state, 'connected');
    // nbdkit file offers CAN_MULTI_CONN; qemu-nbd 7.2 does not for a writable export.
    assert.equal(backing.multiConn, kind === 'nbdkit');
    assert.equal(backing.connections, kind === 'nbdkit' ? 4 : 1);
    const text = await runPcacheInProcess(['stats', cache]);
    assert.match(text.stdout, /^backing\.state: connected$/m);
  } finally {
    await srv.stop();
  }
  // Stopped cleanly, both servers gone: the file still holds the copy.
  await backend.stop();
  assert.equal(sha(await readFile(disk)), sha(await readFile(join(dir, 'src.bin'))));
}

test('pcache in front of nbdkit file: qemu-io patterns and nbdcopy through the chain; pcache flush fills the backing file', (t) =>
  chain(t, 'nbdkit'));

test('pcache in front of qemu-nbd: qemu-io patterns and nbdcopy through the chain; pcache flush fills the backing file', (t) =>
  chain(t, 'qemu-nbd'));

test('a slow backing (nbdkit delay filter): writes through pcache complete, and after pcache flush the nbdkit file equals them', async (t) => {
  if (!(await needTools(t, 'nbdkit'))) return;
  if (!(await havePythonNbd())) return t.skip('python3-libnbd is not installed for /usr/bin/python3');
  const size = 16 * MiB;
  const dir = await tempDir();
  const cache = await sparseFile(join(dir, 'cache.img'), 512 * MiB);
  const disk = await sparseFile(join(dir, 'disk.img'), size);
  const base = randomBytes(size);
  await writeFile(disk, base);
  await writeFile(disk + '.base', base);
  const backend = await startNbdkit(dir, ['--filter=delay', 'file', disk, 'delay-write=2ms', 'delay-read=2ms']);
  t.after(() => backend.stop());
  const srv = await startServe(dir, cache, backend.uri);
  // 2000 random 4 KiB writes (some overlapping), reads of data only the backing has, all
  // checked against a model whose image goes to a file.
  try {
    const py = await runPython(
      `
import sys, random, nbd
uri, base_path, out_path = sys.argv[1], sys.argv[2], sys.argv[3]
model = bytearray(open(base_path, "rb").read())
rng = random.Random(7)
h = nbd.NBD()
h.connect_uri(uri)
for i in range(2000):
    off = rng.randrange(0, len(model) // 4096) * 4096
    data = rng.randbytes(4096)
    h.pwrite(data, off)
    model[off:off + 4096] = data
    if i % 250 == 0:
        off = rng.randrange(0, len(model) // 65536) * 65536
        assert h.pread(65536, off) == bytes(model[off:off + 65536]), "read %d" % off
h.flush()
for off in range(0, len(model), 1 << 20):
    assert h.pread(1 << 20, off) == bytes(model[off:off + (1 << 20)]), "final read %d" % off
h.shutdown()
open(out_path, "wb").write(model)
print("ok")
`,
      [srv.uri, disk + '.base', join(dir, 'model.bin')],
      60_000,
    );
    assert.equal(py.code, 0, py.stdout + py.stderr);
    assert.equal(py.stdout.trim(), 'ok');
    const fl = await runPcache(['flush', cache], { timeoutMs: 60_000 });
    assert.equal(fl.code, 0, fl.stderr);
    assert.equal(sha(await readFile(disk)), sha(await readFile(join(dir, 'model.bin'))));
  } finally {
    await srv.stop();
  }
});

/** A unix-socket server that runs `onConn` for every connection. */
async function fakeServer(path: string, onConn: (s: net.Socket) => void): Promise<() => Promise<void>> {
  const conns = new Set<net.Socket>();
  const server = net.createServer((s) => {
    conns.add(s);
    s.on('error', () => undefined);
    s.on('close', () => conns.delete(s));
    onConn(s);
  });
  await new Promise<void>((r) => server.listen(path, r));
  return () =>
    new Promise<void>((r) => {
      for (const c of conns) c.destroy();
      server.close(() => r());
    });
}

test('pcache serve with a backing server that hangs up mid-handshake or answers garbage: a clear error, no crash', async () => {
  const dir = await tempDir();
  const cache = await sparseFile(join(dir, 'cache.img'), 512 * MiB);
  const cases: Array<[string, (s: net.Socket) => void, RegExp]> = [
    [
      'mid-handshake',
      (s) => {
        s.write(encodeGreeting(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES));
        s.once('data', () => s.destroy());
      },
      /closed the connection during the handshake|ECONNRESET|EPIPE/,
    ],
    ['garbage', (s) => s.end(Buffer.from('SSH-2.0-OpenSSH_9.2\r\n'.repeat(4))), /magic|greeting|NBD/i],
  ];
  for (const [name, onConn, expect] of cases) {
    const sock = join(dir, `${name}.sock`);
    const close = await fakeServer(sock, onConn);
    try {
      const uri = `nbd+unix:///disk?socket=${sock}`;
      await assert.rejects(startServe(dir, cache, uri), (e: Error) => {
        assert.match(e.message, /exited \(1\) before it was ready/, name);
        assert.match(e.message, new RegExp(`cannot open the NBD backing device nbd\\+unix:///disk\\?socket=`), e.message);
        assert.match(e.message, expect, e.message);
        assert.doesNotMatch(e.message, /    at |TypeError|unhandled/i, `no stack trace: ${e.message}`);
        return true;
      });
    } finally {
      await close();
    }
  }
});
