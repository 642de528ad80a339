/**
 * pcache in front of Ceph RBD (issue 16): a one-node cluster in a temporary directory, the image
 * exported by qemu-nbd's rbd driver, `pcache serve` with that export as its backing device.
 * What pcache acknowledged and flushed must reach RBD itself, read back around pcache (qemu-nbd
 * directly and `rbd export`), also when pcache is SIGKILLed mid-write and restarted on the same
 * cache device. Runs only where the Ceph packages are installed (.ci/run does not install them).
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtemp, open, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { cephMissing, startCluster, type CephCluster } from '../../bench/ceph/cluster.js';
import type { Server } from '../../bench/nbd/servers.js';
import { controlRequest } from '../../src/cli/control.js';
import { runPcache } from '../helpers/cli.js';
import { sparseFile, startServe, type ServeProc } from '../helpers/serve.js';
import { haveTool, havePythonNbd, run, SYSTEM_PYTHON } from '../nbd/helpers.js';

const MiB = 1024 * 1024;
const IMAGE_SIZE = 1024 * MiB;
const CACHE_SIZE = 512 * MiB;
/** Test 1 writes [0, 96 MiB); the SIGKILL test flushes region A, then is killed writing region B. */
const COPY_SIZE = 96 * MiB;
const REGION_A = { offset: 256 * MiB, size: 48 * MiB };
const REGION_B = { offset: 512 * MiB, size: 64 * MiB };

/** Why the suite cannot run here, or null. */
async function missing(): Promise<string | null> {
  const ceph = cephMissing();
  if (ceph) return ceph;
  for (const tool of ['nbdcopy']) if (!(await haveTool(tool))) return `${tool} is not installed (apt-get install libnbd-bin)`;
  if (!(await havePythonNbd())) return 'python3-libnbd is not installed';
  return null;
}

// The suite's SKIP line carries the reason.
const skipReason = await missing();

/**
 * Writes region A as 4 KiB writes in a shuffled order (32 in flight), flushes, says FLUSHED, then
 * writes random 4 KiB blocks over region B until killed. 4 KiB random keys are what write-back
 * drains slowest, so region A is still dirty in the cache when pcache is killed.
 */
const WRITER = `
import nbd, sys, random
uri, src, a_off, b_off, b_size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
data = open(src, "rb").read()
h = nbd.NBD()
h.connect_uri(uri)
blocks = list(range(len(data) // 4096))
random.Random(16).shuffle(blocks)
cookies = []
for b in blocks:
    while h.aio_in_flight() >= 32:
        h.poll(-1)
    cookies.append(h.aio_pwrite(data[b * 4096:(b + 1) * 4096], a_off + b * 4096))
while h.aio_in_flight() > 0:
    h.poll(-1)
for c in cookies:
    h.aio_command_completed(c)
h.flush()
print("FLUSHED", flush=True)
rnd = random.Random(17)
n = 0
while True:
    h.pwrite(rnd.randbytes(4096), b_off + rnd.randrange(b_size // 4096) * 4096)
    n += 1
    if n % 64 == 0:
        print("B %d" % n, flush=True)
`;

async function readRange(path: string, offset: number, length: number): Promise<Buffer> {
  const fh = await open(path, 'r');
  try {
    const buf = Buffer.alloc(length);
    const { bytesRead } = await fh.read(buf, 0, length, offset);
    assert.equal(bytesRead, length, `${path} is shorter than ${offset + length} bytes`);
    return buf;
  } finally {
    await fh.close();
  }
}

/** The whole image read back around pcache: through qemu-nbd directly, and by `rbd export`. */
async function readRbdBothWays(dir: string, cluster: CephCluster, direct: Server, tag: string): Promise<{ viaNbd: string; viaExport: string }> {
  const viaNbd = join(dir, `${tag}-direct.img`);
  const copy = await run('nbdcopy', [direct.uri, viaNbd], { timeoutMs: 120_000 });
  assert.equal(copy.code, 0, `nbdcopy from qemu-nbd failed: ${copy.stderr}`);
  const viaExport = join(dir, `${tag}-export.img`);
  await cluster.exportToFile(viaExport);
  return { viaNbd, viaExport };
}

async function dirtyBytes(cacheDev: string): Promise<number> {
  const res = await controlRequest(cacheDev, { cmd: 'stats', args: [] });
  assert.ok(res.ok, `pcache stats: ${res.error}`);
  return (res.data as { dirtyBytes: number }).dirtyBytes;
}

async function pcacheFlush(cacheDev: string): Promise<void> {
  const r = await runPcache(['flush', cacheDev], { timeoutMs: 300_000 });
  assert.equal(r.code, 0, `pcache flush failed: ${r.stderr}`);
}

describe('pcache in front of Ceph RBD (qemu-nbd rbd export)', { skip: skipReason ?? false, timeout: 600_000 }, () => {
  let dir: string;
  let cluster: CephCluster | null = null;
  let direct: Server | null = null;
  let backingUri: string;
  const serves: ServeProc[] = [];

  before(async () => {
    // Not tempDir(): its after() hook, registered from here, would run before the tests.
    dir = await mkdtemp(join(tmpdir(), 'pcache-ceph-'));
    cluster = await startCluster({ dir: join(dir, 'ceph'), imageSize: IMAGE_SIZE, osdBytes: 4 * 1024 * MiB });
    direct = await cluster.exportImage({ id: 'rbd', label: 'qemu-nbd rbd', socket: join(dir, 'rbd.sock') });
    backingUri = direct.uri;
  });

  // Ends by PID whatever a test left running, then the cluster, then removes the files.
  after(async () => {
    try {
      for (const s of serves) if (s.proc.exitCode === null && s.proc.signalCode === null) await s.kill('SIGKILL');
      await direct?.stop();
      await cluster?.stop();
    } finally {
      if (dir) await rm(dir, { recursive: true, force: true });
    }
  });

  test('written through pcache and flushed, RBD holds the same bytes (qemu-nbd and rbd export)', async () => {
    const src = join(dir, 'copy-source.img');
    await writeFile(src, randomBytes(COPY_SIZE));
    const cacheDev = await sparseFile(join(dir, 'cache1.img'), CACHE_SIZE);
    const pcache = await startServe(dir, cacheDev, backingUri);
    serves.push(pcache);
    const copy = await run('nbdcopy', ['--flush', src, pcache.uri], { timeoutMs: 120_000 });
    assert.equal(copy.code, 0, `nbdcopy into pcache failed: ${copy.stderr}`);
    await pcacheFlush(cacheDev);
    assert.equal(await dirtyBytes(cacheDev), 0);
    assert.equal(await pcache.stop(), 0, pcache.stderr());

    const expected = await readFile(src);
    const { viaNbd, viaExport } = await readRbdBothWays(dir, cluster!, direct!, 'copy');
    for (const path of [viaNbd, viaExport]) {
      assert.ok((await readRange(path, 0, COPY_SIZE)).equals(expected), `${path}: RBD does not hold what was written through pcache`);
      // Nothing else was written: the rest of the image is still zeros.
      const rest = await readRange(path, COPY_SIZE, 64 * MiB);
      assert.ok(rest.equals(Buffer.alloc(rest.length)), `${path}: RBD holds data past what was written`);
    }
  });

  test('SIGKILLed mid-write and restarted on the same cache, what was flushed reaches RBD', async (t) => {
    const src = join(dir, 'region-a.img');
    await writeFile(src, randomBytes(REGION_A.size));
    const cacheDev = await sparseFile(join(dir, 'cache2.img'), CACHE_SIZE);
    const first = await startServe(dir, cacheDev, backingUri);
    serves.push(first);

    const writer = spawn(SYSTEM_PYTHON, ['-c', WRITER, first.uri, src, String(REGION_A.offset), String(REGION_B.offset), String(REGION_B.size)], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    let err = '';
    writer.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
    writer.stderr.setEncoding('utf8').on('data', (d: string) => (err += d));
    const writerExited = new Promise<void>((r) => writer.once('exit', () => r()));
    let dirtyAtKill = 0;
    try {
      // Killed once region A is flushed and writes to region B are under way.
      const deadline = Date.now() + 120_000;
      while (!/^B \d+$/m.test(out)) {
        assert.ok(writer.exitCode === null, `the writer ended early: ${err || out}`);
        assert.ok(Date.now() < deadline, `the writer did not get to region B: ${out} ${err}`);
        await new Promise((r) => setTimeout(r, 20));
      }
      assert.match(out, /^FLUSHED$/m);
      dirtyAtKill = await dirtyBytes(cacheDev);
      await first.kill('SIGKILL');
    } finally {
      if (writer.exitCode === null) writer.kill('SIGKILL');
      await writerExited;
    }
    // Otherwise the restart would have nothing to replay and write back: the test would prove little.
    assert.ok(dirtyAtKill > 0, 'region A was written back before the kill; nothing was left to recover');
    t.diagnostic(`${dirtyAtKill} bytes dirty in the cache at the SIGKILL`);

    const second = await startServe(dir, cacheDev, backingUri);
    serves.push(second);
    await pcacheFlush(cacheDev);
    assert.equal(await dirtyBytes(cacheDev), 0);
    assert.equal(await second.stop(), 0, second.stderr());

    const expected = await readFile(src);
    const { viaNbd, viaExport } = await readRbdBothWays(dir, cluster!, direct!, 'killed');
    for (const path of [viaNbd, viaExport]) {
      const got = await readRange(path, REGION_A.offset, REGION_A.size);
      assert.ok(got.equals(expected), `${path}: flushed data in region A did not reach RBD after the SIGKILL and restart (${dirtyAtKill} bytes were dirty at the kill)`);
    }
  });
});
