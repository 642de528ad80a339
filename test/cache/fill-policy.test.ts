/**
 * Which misses are filled: sequential read streams past the cutoff are not (bcache's
 * sequential_cutoff), and fill work that falls behind is dropped rather than queued, while the
 * replies never wait for it.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { MemoryBacking } from '../../src/backing/memory.js';
import { Cache } from '../../src/cache/cache.js';
import { FILL_BACKLOG_MAX, FILL_BYTES_PER_SEC, FILL_KEYS_PER_SEC, FillGate, SEQUENTIAL_CUTOFF_DEFAULT } from '../../src/cache/fill.js';
import { seededRng, testSeed } from '../helpers/rng.js';
import { CACHE_SIZE, FAST, GatedMedium, keepProcessAlive, MiB, pattern, StoreMedium, waitFor } from './helpers.js';

keepProcessAlive();

const SEED = testSeed('PCACHE_SEED');
console.log(`fill-policy test seed ${SEED} (replay with PCACHE_SEED=${SEED})`);

const IMAGE = 64 * MiB;

async function openWithImage(opts: { sequentialCutoff?: number } = {}): Promise<{ cache: Cache; image: Buffer; medium: GatedMedium }> {
  const image = pattern(seededRng(SEED), IMAGE);
  const medium = new GatedMedium(new StoreMedium(CACHE_SIZE));
  const cache = await Cache.open(medium, new MemoryBacking(Buffer.from(image)), { ...FAST, ...opts });
  return { cache, image, medium };
}

function counters(cache: Cache): ReturnType<Cache['status']>['counters'] {
  return cache.status().counters;
}

test('the stream tracker: a read continuing a stream adds to it, others start their own', () => {
  const gate = new FillGate(4 * MiB);
  // Two interleaved sequential streams, 1 MiB reads: each passes the cutoff on its fifth read.
  const seen: boolean[] = [];
  for (let i = 0; i < 6; i++) {
    seen.push(gate.beyondCutoff(i * MiB, MiB));
    seen.push(gate.beyondCutoff(32 * MiB + i * MiB, MiB));
  }
  assert.deepEqual(seen, [false, false, false, false, false, false, false, false, true, true, true, true]);
  // A read elsewhere is a new stream; one read larger than the cutoff is past it by itself.
  assert.equal(gate.beyondCutoff(100 * MiB, MiB), false);
  assert.equal(gate.beyondCutoff(200 * MiB, 4 * MiB + 4096), true);
  gate.sequentialCutoff = 0;
  assert.equal(gate.beyondCutoff(6 * MiB, MiB), false, '0 turns the cutoff off');
  assert.throws(() => (gate.sequentialCutoff = -1), /sequential_cutoff/);
  assert.equal(new FillGate().sequentialCutoff, SEQUENTIAL_CUTOFF_DEFAULT);
});

test('the gate admits one kset worth of keys and 32 MiB at once, then only at its rates', () => {
  const keys = new FillGate(0, Number.MAX_SAFE_INTEGER);
  let n = 0;
  while (keys.admit(4096) && n < 10_000) n++;
  // The burst, plus whatever the rate refilled while the loop ran (a key per 4 ms).
  assert.ok(n >= 128 && n <= 130, `${n} small fills admitted at once`);
  const bytes = new FillGate(0, Number.MAX_SAFE_INTEGER);
  let m = 0;
  while (bytes.admit(MiB) && m < 10_000) m++;
  assert.ok(m >= 32 && m <= 33, `${m} 1 MiB fills admitted at once`);
  assert.ok(FILL_BYTES_PER_SEC >= MiB && FILL_KEYS_PER_SEC >= 1);
});

test('sequential read streams past the cutoff are not filled; random reads are; 0 turns the cutoff off', async () => {
  const { cache, image } = await openWithImage();
  assert.equal(cache.status().sequentialCutoff, 4 * MiB);
  for (let off = 0; off < 8 * MiB; off += MiB) assert.ok((await cache.read(off, MiB)).equals(image.subarray(off, off + MiB)), `read at ${off}`);
  await waitFor(() => counters(cache).fillBytes === 4 * MiB, 'the first 4 MiB of the stream to be filled');
  assert.equal(counters(cache).sequentialSkippedBytes, 4 * MiB, 'the rest of the stream is not filled');

  // What was filled now hits; what was skipped still misses (and is still right).
  const hits0 = counters(cache).readHitBytes;
  assert.ok((await cache.read(0, 4 * MiB)).equals(image.subarray(0, 4 * MiB)));
  assert.equal(counters(cache).readHitBytes - hits0, 4 * MiB);
  const miss0 = counters(cache).readMissBytes;
  assert.ok((await cache.read(6 * MiB, MiB)).equals(image.subarray(6 * MiB, 7 * MiB)));
  assert.equal(counters(cache).readMissBytes - miss0, MiB);
  // That read started no stream's continuation: it is a stream of its own, and filled.
  await waitFor(() => counters(cache).fillBytes === 5 * MiB, 'the lone read to be filled');

  // Random (non-adjacent) reads are each their own stream: all filled, however many.
  const filled0 = counters(cache).fillBytes;
  for (let i = 0; i < 16; i++) {
    const off = 16 * MiB + ((i * 7) % 16) * MiB;
    assert.ok((await cache.read(off, 256 * 1024)).equals(image.subarray(off, off + 256 * 1024)));
  }
  await waitFor(() => counters(cache).fillBytes === filled0 + 4 * MiB, 'the random reads to be filled');

  // One read larger than the cutoff is not filled; with the cutoff off, a long stream is.
  const skipped0 = counters(cache).sequentialSkippedBytes;
  assert.ok((await cache.read(40 * MiB, 8 * MiB)).equals(image.subarray(40 * MiB, 48 * MiB)));
  assert.equal(counters(cache).sequentialSkippedBytes - skipped0, 8 * MiB);
  cache.setSequentialCutoff(0);
  assert.equal(cache.status().sequentialCutoff, 0);
  const filled1 = counters(cache).fillBytes;
  for (let off = 48 * MiB; off < 56 * MiB; off += MiB) assert.ok((await cache.read(off, MiB)).equals(image.subarray(off, off + MiB)));
  await waitFor(() => counters(cache).fillBytes === filled1 + 8 * MiB, 'the whole stream to be filled with the cutoff off');
  assert.throws(() => cache.setSequentialCutoff(-5), /Invalid argument/);
  assert.throws(() => cache.setSequentialCutoff(1.5), /Invalid argument/);
  await cache.close();
});

test('fill work that falls behind is dropped, not queued; replies never wait for fills', async () => {
  const { cache, image, medium } = await openWithImage();
  // Park the fills' data writes (nothing else writes 1 MiB to the cache device here).
  const hold = medium.gate.hold((_off, len) => len === MiB, ['write']);
  const reads = 20;
  const offsets = Array.from({ length: reads }, (_, i) => i * 2 * MiB);
  // Every read returns while the first fill is parked: no reply waits for fill work.
  const got = await Promise.all(offsets.map((off) => cache.read(off, MiB)));
  for (const [i, off] of offsets.entries()) assert.ok(got[i]!.equals(image.subarray(off, off + MiB)), `read at ${off}`);
  await hold.waitParked(1);
  await new Promise((r) => setTimeout(r, 50));
  assert.equal(hold.parked, 1, 'fills run one at a time');
  const admitted = FILL_BACKLOG_MAX / MiB;
  assert.equal(cache.status().fillBacklogBytes, admitted * MiB, 'the backlog stops at its limit');
  assert.equal(counters(cache).fillDroppedBytes, (reads - admitted) * MiB, 'the misses beyond it are not filled');

  hold.release();
  await waitFor(() => cache.status().fillBacklogBytes === 0, 'the backlog to drain');
  assert.equal(counters(cache).fillBytes, admitted * MiB);
  // The admitted ranges now hit; the dropped ones left no placeholder behind and read right.
  const hits0 = counters(cache).readHitBytes;
  for (const off of offsets) assert.ok((await cache.read(off, MiB)).equals(image.subarray(off, off + MiB)), `reread at ${off}`);
  assert.equal(counters(cache).readHitBytes - hits0, admitted * MiB);
  const w = pattern(seededRng(SEED + 1), MiB);
  await cache.write(offsets[reads - 1]!, w);
  assert.ok((await cache.read(offsets[reads - 1]!, MiB)).equals(w));
  await cache.close();
});

test('a failed backing read gives its fill reservation back', async () => {
  const image = pattern(seededRng(SEED + 2), 16 * MiB);
  const backing = new MemoryBacking(Buffer.from(image));
  const cache = await Cache.open(new StoreMedium(CACHE_SIZE), backing, FAST);
  backing.failReads(() => true);
  await assert.rejects(cache.read(0, MiB), /backing device read failed/);
  backing.failReads(null);
  assert.equal(cache.status().fillBacklogBytes, 0);
  assert.ok((await cache.read(0, MiB)).equals(image.subarray(0, MiB)));
  await waitFor(() => counters(cache).fillBytes === MiB, 'the retried read to be filled');
  await cache.close();
});

test('fill keys are rate-limited: a burst of small misses fills one kset worth, then the rate', async () => {
  const { cache, image } = await openWithImage();
  const reads = 400;
  const t0 = performance.now();
  // Non-adjacent 4 KiB reads, 32 at a time: each its own stream, each wanting its own fill key.
  for (let i = 0; i < reads; i += 32) {
    const batch = Array.from({ length: Math.min(32, reads - i) }, (_, j) => (i + j) * 64 * 1024);
    const got = await Promise.all(batch.map((off) => cache.read(off, 4096)));
    for (const [j, off] of batch.entries()) assert.ok(got[j]!.equals(image.subarray(off, off + 4096)), `read at ${off}`);
  }
  const seconds = (performance.now() - t0) / 1000;
  await waitFor(() => cache.status().fillBacklogBytes === 0, 'the fills to finish');
  const c = counters(cache);
  const allowed = 128 + Math.ceil(seconds * FILL_KEYS_PER_SEC) + 1;
  assert.ok(c.fillBytes / 4096 >= 128, `at least one kset worth is filled (${c.fillBytes / 4096} keys)`);
  assert.ok(c.fillBytes / 4096 <= allowed, `no more than the rate allows: ${c.fillBytes / 4096} keys in ${seconds.toFixed(2)} s`);
  assert.equal(c.fillBytes + c.fillDroppedBytes, reads * 4096, 'every miss is either filled or dropped');
  await cache.close();
});
