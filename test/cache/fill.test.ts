/**
 * The cache fills and keeps working: write four times the cache's size through a 512 MiB cache;
 * every read, during and after, returns the newest data; status shows that GC and write-back ran
 * and that segments were freed and reused.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Cache } from '../../src/cache/cache.js';
import { samePosition } from '../../src/format/index.js';
import { seededRng, testSeed } from '../helpers/rng.js';
import { CACHE_SIZE, FAST, KiB, MiB, StoreBacking, StoreMedium } from './helpers.js';

const BACKING_SIZE = 256 * MiB;
const BLOCK = 4 * KiB;
const WRITERS = 4;
const SEED = testSeed('PCACHE_SEED');
console.log(`fill test seed ${SEED} (replay with PCACHE_SEED=${SEED})`);

/**
 * The model: for each 4 KiB block, the number of the write that last wrote it. A block's content
 * is its number and that write's number, repeated, so data is cheap to make and to check.
 */
const stamps = new Uint32Array(BACKING_SIZE / BLOCK);

function fillStamped(buf: Buffer, firstBlock: number, stampOf: (block: number) => number): Buffer {
  const tag = Buffer.alloc(8);
  for (let i = 0; i * BLOCK < buf.length; i++) {
    tag.writeUInt32LE(firstBlock + i, 0);
    tag.writeUInt32LE(stampOf(firstBlock + i), 4);
    buf.fill(tag, i * BLOCK, (i + 1) * BLOCK);
  }
  return buf;
}

function checkStamped(got: Buffer, off: number, what: string): void {
  const want = fillStamped(Buffer.allocUnsafe(got.length), off / BLOCK, (b) => stamps[b]!);
  if (!got.equals(want)) {
    let i = 0;
    while (got[i] === want[i]) i++;
    const block = (off + i) / BLOCK;
    assert.fail(`${what}: block ${Math.floor(block)} holds write ${got.readUInt32LE(Math.floor(i / BLOCK) * BLOCK + 4)}, expected ${stamps[Math.floor(block)]}`);
  }
}

test(`a 512 MiB cache takes 2 GiB of writes and keeps serving the newest data (seed ${SEED})`, { timeout: 240_000 }, async () => {
  const rng = seededRng(SEED);
  const medium = new StoreMedium(CACHE_SIZE);
  const backing = new StoreBacking(BACKING_SIZE);
  // Stamps 0 mean "never written": the device reads as zeros there.
  const zeroBlock = Buffer.alloc(BLOCK);
  const check = (got: Buffer, off: number, what: string): void => {
    for (let i = 0; i < got.length; i += BLOCK) {
      const b = (off + i) / BLOCK;
      if (stamps[b] === 0) {
        assert.ok(got.subarray(i, i + BLOCK).equals(zeroBlock), `${what}: block ${b} was never written but is not zero`);
      } else {
        checkStamped(got.subarray(i, i + BLOCK), off + i, what);
      }
    }
  };

  let cache = await Cache.open(medium, backing, { ...FAST });
  const quarter = BACKING_SIZE / WRITERS;
  let writeNo = 0;
  let written = 0;
  const total = 4 * CACHE_SIZE;
  let maxUsed = 0;

  // Four writers, each in its own quarter of the device, so the model never depends on timing.
  const writer = async (w: number): Promise<void> => {
    const base = w * quarter;
    while (written < total) {
      const len = (256 + rng.int(769)) * BLOCK; // 1 MiB to 4 MiB
      const off = base + rng.int((quarter - len) / BLOCK + 1) * BLOCK;
      const no = ++writeNo;
      const data = fillStamped(Buffer.allocUnsafe(len), off / BLOCK, () => no);
      written += len;
      await cache.write(off, data, { fua: rng.next() < 0.05 });
      for (let b = off / BLOCK; b < (off + len) / BLOCK; b++) stamps[b] = no;
      maxUsed = Math.max(maxUsed, cache.status().segsUsed);
      if (rng.next() < 0.3) {
        const rlen = (1 + rng.int(256)) * BLOCK;
        const roff = base + rng.int((quarter - rlen) / BLOCK + 1) * BLOCK;
        check(await cache.read(roff, rlen), roff, `read at ${roff}+${rlen} after ${written} bytes`);
      }
    }
  };
  await Promise.all(Array.from({ length: WRITERS }, (_, w) => writer(w)));

  const st = cache.status();
  const c = st.counters;
  assert.ok(c.writeBytes >= total, `wrote ${c.writeBytes} bytes`);
  assert.ok(c.writtenBackKsets > 0 && c.writtenBackBytes > CACHE_SIZE, `write-back ran (${c.writtenBackBytes} bytes)`);
  assert.ok(c.gcRuns > 0 && c.gcKsets > 0, `GC ran (${c.gcRuns} runs)`);
  assert.ok(c.segmentsFreed >= st.nSegs, `segments were freed and reused (${c.segmentsFreed} freed)`);
  assert.equal(c.writebackErrors, 0);
  assert.equal(st.gcError, null);
  assert.ok(maxUsed >= Math.floor((st.nSegs * st.gcPercent) / 100), `the cache filled up to gc_percent (${maxUsed} of ${st.nSegs} segments)`);

  // Everything reads back right, still through the cache.
  for (let off = 0; off < BACKING_SIZE; off += 4 * MiB) check(await cache.read(off, 4 * MiB), off, `final read at ${off}`);

  // And after a drain the backing device holds it all; a reopened cache agrees.
  await cache.drain({ maxErrors: 0 });
  assert.ok(samePosition(cache.dirtyTail, cache.keyHead));
  await cache.close();
  const buf = Buffer.allocUnsafe(4 * MiB);
  for (let off = 0; off < BACKING_SIZE; off += buf.length) check(await backing.read(buf, off).then(() => buf), off, `backing at ${off}`);
  cache = await Cache.open(medium, backing, FAST);
  for (let off = 0; off < BACKING_SIZE; off += 4 * MiB) check(await cache.read(off, 4 * MiB), off, `read after reopen at ${off}`);
  await cache.close();
});
