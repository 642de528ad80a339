/**
 * `pcache serve` over an NBD backing that fails: the backing server SIGKILLed and restarted
 * during write-back, and a backing that answers EIO half the time (nbdkit error filter).
 */
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import { controlRequest } from '../../src/cli/control.js';
import { runPcache, runPcacheInProcess } from '../helpers/cli.js';
import { startNbdkit } from '../helpers/nbd-servers.js';
import { sparseFile, startServe } from '../helpers/serve.js';
import { tempDir } from '../helpers/tmp.js';
import { haveTool, havePythonNbd, run, runPython } from '../nbd/helpers.js';

const MiB = 1024 * 1024;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function sha(buf: Buffer): string {
  return createHash('sha256').update(buf).digest('hex');
}

interface Stats {
  dirtyBytes: number;
  dirtyTail: { seg: number; off: number };
  keyHead: { seg: number; off: number };
  writebackError: string | null;
  counters: { writtenBackBytes: number; writebackErrors: number };
  backing: { state: string; connected: boolean; connections: number; reconnects: number; disconnects: number; flushesRefused: number; pending: number; lastError: string | null };
}

async function stats(cache: string): Promise<Stats> {
  const r = await controlRequest(cache, { cmd: 'stats', args: [] });
  assert.ok(r.ok, r.error);
  return r.data as Stats;
}

async function waitStats(cache: string, what: string, cond: (s: Stats) => boolean, ms = 20_000): Promise<Stats> {
  const end = Date.now() + ms;
  for (;;) {
    const s = await stats(cache);
    if (cond(s)) return s;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}: ${JSON.stringify(s)}`);
    await sleep(20);
  }
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

test('the backing server is SIGKILLed during write-back and restarted: pcache reconnects, write-back resumes, the backing image is right', async (t) => {
  if (!(await needTools(t, 'nbdkit', 'nbdcopy', 'qemu-io'))) return;
  const size = 32 * MiB;
  const dir = await tempDir();
  const cache = await sparseFile(join(dir, 'cache.img'), 512 * MiB);
  const disk = await sparseFile(join(dir, 'disk.img'), size);
  // Slow writes keep the drain going long enough to be interrupted.
  const backend = await startNbdkit(dir, ['--filter=delay', 'file', disk, 'delay-write=150ms']);
  t.after(() => backend.stop());
  const srv = await startServe(dir, cache, backend.uri);
  try {
    const expected = randomBytes(size);
    await writeFile(join(dir, 'src.bin'), expected);
    const cin = await run('nbdcopy', [join(dir, 'src.bin'), srv.uri], { timeoutMs: 60_000 });
    assert.equal(cin.code, 0, cin.stderr);

    const flush = runPcache(['flush', cache], { timeoutMs: 60_000 });
    let flushDone = false;
    void flush.then(() => (flushDone = true));
    const before = await waitStats(cache, 'write-back under way', (s) => s.counters.writtenBackBytes > 0 || s.backing.pending > 0);
    assert.notDeepEqual(before.dirtyTail, before.keyHead, 'still dirty when the server dies');
    await backend.kill('SIGKILL');

    // While it is down: stats say so, and clients' writes still complete (into the cache).
    const down = await waitStats(cache, 'backing disconnected', (s) => s.backing.state === 'disconnected');
    assert.equal(down.backing.connected, false);
    assert.equal(down.backing.connections, 0);
    assert.ok(down.backing.disconnects >= 1);
    const text = await runPcacheInProcess(['stats', cache]);
    assert.match(text.stdout, /^backing\.state: disconnected$/m);
    assert.match(text.stdout, /^backing\.connected: false$/m);
    const w = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5e 4M 1M', '-c', 'write -P 0x6f 31M 1M', srv.uri], { timeoutMs: 10_000 });
    assert.equal(w.code, 0, w.stdout + w.stderr);
    expected.fill(0x5e, 4 * MiB, 5 * MiB);
    expected.fill(0x6f, 31 * MiB, 32 * MiB);
    await sleep(600);
    assert.equal(flushDone, false, 'pcache flush cannot finish while the backing is down');
    const still = await stats(cache);
    assert.notDeepEqual(still.dirtyTail, still.keyHead, 'write-back cannot advance while the backing is down');

    await backend.restart();
    const fl = await flush;
    assert.equal(fl.code, 0, fl.stderr);
    const after = await stats(cache);
    assert.equal(after.backing.state, 'connected');
    assert.ok(after.backing.reconnects >= 1, JSON.stringify(after.backing));
    assert.ok(after.backing.flushesRefused >= 1, 'a flush after the loss was refused, and the kset written again');
    assert.deepEqual(after.dirtyTail, after.keyHead, 'everything written back');
    assert.equal(after.writebackError, null);
    assert.equal(sha(await readFile(disk)), sha(expected));
    assert.match(srv.stderr(), /backing .* lost/);
    assert.match(srv.stderr(), /restored/);
  } finally {
    await srv.stop();
  }
});

test('a backing failing half its reads and writes (nbdkit error filter): writes succeed, misses fail with EIO (never zeros), write-back retries, then drains', async (t) => {
  if (!(await needTools(t, 'nbdkit'))) return;
  if (!(await havePythonNbd())) return t.skip('python3-libnbd is not installed for /usr/bin/python3');
  const size = 32 * MiB;
  const dir = await tempDir();
  const cache = await sparseFile(join(dir, 'cache.img'), 512 * MiB);
  const disk = join(dir, 'disk.img');
  // The upper half holds data only the backing has (every read of it is a miss).
  const base = Buffer.concat([Buffer.alloc(16 * MiB), randomBytes(16 * MiB)]);
  await writeFile(disk, base);
  await writeFile(join(dir, 'base.bin'), base);
  const trigger = join(dir, 'errors-on');
  await writeFile(trigger, '');
  const backend = await startNbdkit(dir, ['--filter=error', 'file', disk, 'error=EIO', 'error-rate=50%', `error-file=${trigger}`]);
  t.after(() => backend.stop());
  const srv = await startServe(dir, cache, backend.uri);
  try {
    const written = randomBytes(8 * MiB);
    await writeFile(join(dir, 'written.bin'), written);
    const script = `
import sys, json, nbd
uri, written_path, base_path = sys.argv[1], sys.argv[2], sys.argv[3]
written = open(written_path, "rb").read()
base = open(base_path, "rb").read()
h = nbd.NBD()
h.connect_uri(uri)
# Writes go to the cache: every one succeeds, whatever the backing does.
for off in range(0, len(written), 256 * 1024):
    h.pwrite(written[off:off + 256 * 1024], off)
h.flush()
assert h.pread(len(written), 0) == written
# Misses: 48 distinct blocks the cache has never seen.
errors = ok = 0
for i in range(48):
    off = 16 * 1024 * 1024 + i * 256 * 1024
    try:
        data = h.pread(4096, off)
    except nbd.Error as e:
        assert e.errnum == 5, "errno %r" % e.errnum
        errors += 1
        continue
    assert data == base[off:off + 4096], "a failed miss must never read as anything else (block %d)" % i
    ok += 1
h.shutdown()
print(json.dumps({"errors": errors, "ok": ok}))
`;
    const py = await runPython(script, [srv.uri, join(dir, 'written.bin'), join(dir, 'base.bin')], 60_000);
    assert.equal(py.code, 0, py.stdout + py.stderr);
    const { errors, ok } = JSON.parse(py.stdout) as { errors: number; ok: number };
    assert.equal(errors + ok, 48);
    assert.ok(errors >= 1, `some misses failed (${errors} failed, ${ok} read)`);
    assert.ok(ok >= 1, `some misses were read (${errors} failed, ${ok} read)`);

    // Write-back meets the errors, keeps the data dirty and retries.
    const failing = await waitStats(cache, 'a write-back error', (st) => st.counters.writebackErrors >= 2);
    assert.ok(failing.writebackError, 'the error is reported');
    assert.notDeepEqual(failing.dirtyTail, failing.keyHead);
    assert.equal(failing.backing.state, 'connected', 'error replies are not a lost connection');

    await rm(trigger);
    const fl = await runPcache(['flush', cache], { timeoutMs: 60_000 });
    assert.equal(fl.code, 0, fl.stderr);
    const done = await stats(cache);
    assert.deepEqual(done.dirtyTail, done.keyHead, 'everything written back');
    assert.equal(done.writebackError, null);
    const expected = Buffer.from(base);
    written.copy(expected, 0);
    assert.equal(sha(await readFile(disk)), sha(expected));
  } finally {
    await srv.stop();
  }
});
