/**
 * GC's threshold and its own timer (spec section 6; issue 14):
 * - GC collects while used segments >= floor(n_segs * gc_percent / 100), as dm-pcache's need_gc()
 *   computes it: a cache filled above that and drained stops at exactly one below it (63 segments
 *   at 70%: 43; at 90%: 55), checked at several sizes and percentages;
 * - an idle cache whose GC stopped above the threshold (here: after a failed read) collects down
 *   to it by itself, without a reopen or a new write: GC re-arms itself like dm-pcache's GC work;
 * - writers waiting for space on a full cache get it in the order they came.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import type { BackingDevice } from '../../src/backing/backing.js';
import { MemoryBacking } from '../../src/backing/memory.js';
import { Cache, type CacheOptions } from '../../src/cache/cache.js';
import { GC_INTERVAL_MS, gcThreshold } from '../../src/cache/gc.js';
import { dataOffset, SEG_SIZE, SEGMENTS_OFF, segmentsFor } from '../../src/format/index.js';
import type { Medium } from '../../src/media/medium.js';
import { CACHE_SIZE, GatedMedium, keepProcessAlive, MiB, StoreMedium, waitFor } from './helpers.js';

keepProcessAlive();

const BACKING_SIZE = 64 * MiB;
const DATA = Buffer.alloc(4 * MiB, 0x5a);

/**
 * A cache device that keeps metadata and ksets but drops large data writes (they read back as
 * zeros): a test can fill a 1 GiB cache without holding 1 GiB. Data is never read back here.
 */
class MetadataOnlyMedium extends StoreMedium {
  override async write(data: Buffer | readonly Buffer[], offset: number): Promise<void> {
    const len = Buffer.isBuffer(data) ? data.length : data.reduce((n, b) => n + b.length, 0);
    if (len >= MiB) return;
    return super.write(data, offset);
  }
}

/** A backing device that takes writes and forgets them, or refuses them while `refusing`. */
class SinkBacking implements BackingDevice {
  readonly name = 'sink';
  refusing = false;
  size(): number {
    return BACKING_SIZE;
  }
  async read(buf: Buffer): Promise<void> {
    buf.fill(0);
  }
  async write(): Promise<void> {
    if (this.refusing) throw Object.assign(new Error('refused by the test'), { code: 'EIO' });
  }
  async flush(): Promise<void> {}
  async close(): Promise<void> {}
}

/** The smallest device of `nSegs` segments (dm-pcache takes nothing below 512 MiB: 31 segments). */
const deviceFor = (nSegs: number): number => Math.max(512 * MiB, SEGMENTS_OFF + nSegs * SEG_SIZE);

/**
 * A cache of `nSegs` segments holding dirty data in `used` segments: written while the backing
 * refuses writes (so neither write-back nor GC can move), one 4 MiB FUA write per kset, so that
 * collecting one kset frees at most one segment; then closed.
 */
async function filledCache(medium: Medium, backing: SinkBacking, used: number, gcPercent: number): Promise<void> {
  backing.refusing = true;
  const cache = await Cache.open(medium, backing, { gcPercent, writebackIntervalMs: 60_000 });
  for (let i = 0; cache.status().segsUsed < used; i++) {
    await cache.write(((i * 4 * MiB) % BACKING_SIZE), DATA, { fua: true });
  }
  await cache.close();
  backing.refusing = false;
}

/** Wait until GC has nothing left to do: no generation bump in flight, key_tail still for a while. */
async function gcSettled(cache: Cache): Promise<void> {
  let last = '';
  let still = 0;
  await waitFor(() => {
    const st = cache.status();
    const now = `${st.keyTail.seg}:${st.keyTail.off} ${st.segsUsed}`;
    still = now === last ? still + 1 : 0;
    last = now;
    return still >= 20;
  }, 'GC to settle');
}

test('the GC threshold is floor(n_segs * gc_percent / 100), as need_gc() computes it', () => {
  assert.equal(gcThreshold(63, 70), 44);
  assert.equal(gcThreshold(63, 90), 56);
  assert.equal(gcThreshold(63, 0), 0);
  assert.equal(gcThreshold(31, 70), 21);
  assert.equal(gcThreshold(40, 33), 13);
  assert.equal(GC_INTERVAL_MS, 5000, "GC's own timer defaults to dm-pcache's 5 s");
});

for (const [nSegs, gcPercent] of [
  [63, 70],
  [63, 90],
  [31, 50],
  [40, 33],
  [47, 65],
] as const) {
  const threshold = Math.floor((nSegs * gcPercent) / 100);
  test(`${nSegs} segments at gc_percent ${gcPercent}: GC collects down to ${threshold - 1} used segments and stops`, async () => {
    assert.equal(segmentsFor(deviceFor(nSegs)), nSegs);
    const medium = new MetadataOnlyMedium(deviceFor(nSegs));
    const backing = new SinkBacking();
    await filledCache(medium, backing, Math.min(nSegs - 2, threshold + 4), gcPercent);
    const cache = await Cache.open(medium, backing, { writebackIntervalMs: 20, ksetCloseMs: 20, gcIntervalMs: 100 });
    const before = cache.status().segsUsed;
    assert.ok(before > threshold, `filled above the threshold (${before} of ${nSegs} used)`);
    await cache.drain({ maxErrors: 0 });
    await gcSettled(cache);
    const st = cache.status();
    assert.equal(st.segsUsed, threshold - 1, `${st.segsUsed} segments used after GC, expected ${threshold - 1} (dm-pcache stops below ${threshold})`);
    assert.notDeepEqual(st.keyTail, st.dirtyTail, 'GC stopped at the threshold, not at dirty_tail');
    assert.equal(st.gcError, null);
    await cache.close();
  });
}

test('an idle cache above the threshold collects down to it on GC’s own timer, without a reopen or a write', async () => {
  const nSegs = 63;
  const medium = new GatedMedium(new MetadataOnlyMedium(deviceFor(nSegs)));
  const backing = new SinkBacking();
  await filledCache(medium, backing, 50, 90);
  // gc_percent 90: 50 used is below 56, GC has nothing to do while everything is written back.
  const opts: CacheOptions = { writebackIntervalMs: 20, ksetCloseMs: 20, gcIntervalMs: 300 };
  const cache = await Cache.open(medium, backing, opts);
  await cache.drain({ maxErrors: 0 });
  const keyTail = cache.keyTail;
  assert.equal(cache.status().segsUsed, 50);
  // The kset at key_tail cannot be read for now: lowered to 70%, GC starts, fails and stops.
  const atKeyTail = dataOffset(keyTail.seg, keyTail.off);
  medium.gate.failReads((off) => off === atKeyTail);
  await cache.setGcPercent(70);
  await waitFor(() => cache.status().gcError !== null, 'GC to fail');
  assert.deepEqual(cache.keyTail, keyTail);
  assert.equal(cache.status().segsUsed, 50);
  // Healed; nothing is written, nothing reopened, write-back has nothing to do: GC's timer alone.
  medium.gate.failReads(null);
  const t0 = Date.now();
  await waitFor(() => cache.status().segsUsed === 43, 'GC to collect down to 43 used segments', 5000);
  const st = cache.status();
  assert.ok(Date.now() - t0 < 5000);
  assert.equal(st.gcError, null, 'the error is cleared once GC succeeds');
  await gcSettled(cache);
  assert.equal(cache.status().segsUsed, 43, 'and stops there');
  await cache.close();
});

test('writers waiting for space on a full cache get it first come, first served', { timeout: 60_000 }, async () => {
  const medium = new MetadataOnlyMedium(CACHE_SIZE);
  const backing = new MemoryBacking(BACKING_SIZE);
  const hold = backing.hold(() => true, ['write']);
  const cache = await Cache.open(medium, backing, { writebackIntervalMs: 20, ksetCloseMs: 20, gcIntervalMs: 100 });
  // Fill the cache while write-back is held: the last fill write waits for space.
  const filling: Array<Promise<void>> = [];
  for (let i = 0; cache.status().counters.writesWaiting === 0; i++) {
    filling.push(cache.write((i * 4 * MiB) % BACKING_SIZE, DATA));
    await sleep(1);
  }
  // Then writers arrive one by one, 70 ms apart: longer than some of them wait for their
  // time-outs (a safety net that must not cost a waiter its place), shorter than others.
  const order: number[] = [];
  const writers: Array<Promise<void>> = [];
  for (let w = 0; w < 8; w++) {
    writers.push(cache.write(w * 64 * 1024, Buffer.alloc(64 * 1024, w)).then(() => void order.push(w)));
    await waitFor(() => cache.status().counters.writesWaiting === 2 + w, `writer ${w} to wait`);
    await sleep(70);
  }
  hold.release();
  await Promise.all([...filling, ...writers]);
  assert.deepEqual(order, [0, 1, 2, 3, 4, 5, 6, 7], 'writers got space in the order they asked for it');
  await cache.close();
});
