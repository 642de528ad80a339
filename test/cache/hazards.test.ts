/**
 * The hazards of spec section 8, each forced by holding and releasing chosen I/O of the cache or
 * the backing device:
 * - a read in flight while its segment is collected and reused;
 * - a miss fill racing a write over the same range;
 * - a write whose data is still in flight is not readable (its key enters the index after);
 * - overlapping writes in flight together: the index and the log agree on the winner.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { MemoryBacking } from '../../src/backing/memory.js';
import { Cache } from '../../src/cache/cache.js';
import { dataOffset, genOffset, samePosition, SEG_DATA_SIZE, SEG_SIZE, SEGMENTS_OFF } from '../../src/format/index.js';
import { seededRng, testSeed } from '../helpers/rng.js';
import { CACHE_SIZE, FAST, GatedMedium, JitterMedium, keepProcessAlive, KiB, MiB, pattern, StoreBacking, StoreMedium, waitFor } from './helpers.js';

keepProcessAlive();

const SEED = testSeed('PCACHE_SEED');
console.log(`hazards test seed ${SEED} (replay with PCACHE_SEED=${SEED})`);

function physSegOf(offset: number): number {
  return Math.floor((offset - SEGMENTS_OFF) / SEG_SIZE);
}

function inDataArea(phys: number, offset: number, length: number): boolean {
  const start = dataOffset(phys, 0);
  return offset < start + SEG_DATA_SIZE && offset + length > start;
}

test('a read in flight keeps its segment: GC collects it, writes cycle through the cache, the read still returns the old data', { timeout: 120_000 }, async () => {
  const rng = seededRng(SEED);
  const medium = new GatedMedium(new StoreMedium(CACHE_SIZE));
  const backing = new StoreBacking(64 * MiB);
  const cache = await Cache.open(medium, backing, { gcPercent: 90, ...FAST });
  const nSegs = cache.status().nSegs;

  // X lands at the start of a data segment S; the rest of S is filled so the data head leaves it.
  const x = pattern(rng, MiB);
  let xAt = -1;
  medium.onIo = (op, off, len) => {
    if (op === 'write' && len === x.length && xAt < 0) xAt = off;
  };
  await cache.write(0, x);
  const S = physSegOf(xAt);
  assert.equal(xAt, dataOffset(S, 0), 'X starts a segment');
  const filler = Buffer.alloc(4 * MiB, 0x11);
  for (let off = 8 * MiB; off < 8 * MiB + SEG_DATA_SIZE; off += filler.length) await cache.write(off, filler);
  // Everything written back, nothing collected yet (gc_percent 90, the cache nearly empty).
  await cache.drain({ maxErrors: 0 });
  assert.equal(cache.status().counters.gcKsets, 0);

  // The read of X is parked inside S (that one read only: were S reused, other reads must pass).
  let parkedOne = false;
  const hold = medium.hold((off, len) => !parkedOne && inDataArea(S, off, len) && (parkedOne = true), ['read']);
  const read = cache.read(0, MiB);
  await hold.waitParked(1);

  // Watch S from now on: its data area must not be rewritten, its generation not bumped.
  const writesToS: number[] = [];
  const genWrites: number[] = [];
  let phase = 'held';
  medium.onIo = (op, off, len) => {
    if (op !== 'write') return;
    if (inDataArea(S, off, len)) writesToS.push(off);
    if (off === genOffset(S, 0) || off === genOffset(S, 1)) genWrites.push(phase === 'held' ? -1 : 1);
  };

  // GC now collects everything written back: S loses its last reference while the read pins it.
  await cache.setGcPercent(0);
  await waitFor(() => samePosition(cache.keyTail, cache.dirtyTail), 'GC to reach dirty_tail');

  // Write more than the whole cache: with S free, the data head would come round to it.
  const fresh = Buffer.alloc(4 * MiB, 0xee);
  let wrote = 0;
  for (let i = 0; wrote < (nSegs + 2) * SEG_DATA_SIZE; i++) {
    await cache.write(16 * MiB + (i % 8) * 4 * MiB, fresh);
    wrote += fresh.length;
  }
  await cache.drain({ maxErrors: 0 });
  assert.ok(cache.status().counters.segmentsFreed >= nSegs - 3, 'the other segments were freed and reused meanwhile');
  assert.deepEqual(writesToS, [], 'the pinned segment was not reused');
  assert.deepEqual(genWrites, [], "the pinned segment's generation did not move");
  assert.equal(hold.parked, 1, 'the read is still parked');

  phase = 'released';
  hold.release();
  const got = await read;
  assert.ok(got.equals(x), 'the read returns the old data, not anything written since');

  // Unpinned, S is invalidated (its generation bumped) and goes back into use.
  await waitFor(() => genWrites.length > 0, "S's generation to move once the read is done");
  for (let i = 0; writesToS.length === 0 && i < 8 * nSegs; i++) await cache.write(16 * MiB + (i % 8) * 4 * MiB, fresh);
  assert.ok(writesToS.length > 0, 'S is reused after the read');
  assert.ok((await cache.read(0, MiB)).equals(x), 'X still reads right (now from the backing device)');
  await cache.close();
});

test('a miss fill whose backing read is in flight never overwrites a newer write', async () => {
  const rng = seededRng(SEED + 1);
  const medium = new StoreMedium(CACHE_SIZE);
  const old = pattern(rng, 256 * KiB);
  const image = Buffer.alloc(16 * MiB);
  old.copy(image, MiB);
  const backing = new MemoryBacking(image);
  const cache = await Cache.open(medium, backing, FAST);

  const hold = backing.hold(() => true, ['read']);
  const read = cache.read(MiB, old.length);
  await hold.waitParked(1);
  const w = pattern(rng, 64 * KiB);
  await cache.write(MiB + 96 * KiB, w);
  hold.release();
  assert.ok((await read).equals(old), 'the read that began first returns the old data');

  const expected = Buffer.from(old);
  w.copy(expected, 96 * KiB);
  // The fill caches what no write replaced: the parts before and after the write.
  await waitFor(() => cache.status().counters.fillBytes >= old.length - w.length, 'the fill of the untouched parts');
  assert.equal(cache.status().counters.fillBytes, old.length - w.length, 'only the parts no write replaced were filled');
  assert.ok((await cache.read(MiB, old.length)).equals(expected), 'the write wins over the fill');
  await cache.close();
  const again = await Cache.open(medium, backing, FAST);
  assert.ok((await again.read(MiB, old.length)).equals(expected), 'and still after close and reopen');
  await again.drain({ maxErrors: 0 });
  assert.ok(backing.image().subarray(MiB, MiB + old.length).equals(expected), 'the backing device gets the write, not the fill');
  await again.close();
});

test('a miss fill whose cache write is in flight is dropped when a write replaces the range meanwhile', async () => {
  const rng = seededRng(SEED + 2);
  const medium = new GatedMedium(new StoreMedium(CACHE_SIZE));
  const old = pattern(rng, 128 * KiB);
  const image = Buffer.alloc(16 * MiB);
  old.copy(image, 2 * MiB);
  const backing = new MemoryBacking(image);
  const cache = await Cache.open(medium, backing, FAST);

  // Only the fill writes exactly old.length bytes.
  const hold = medium.hold((_off, len) => len === old.length, ['write']);
  assert.ok((await cache.read(2 * MiB, old.length)).equals(old));
  await hold.waitParked(1);
  const w = pattern(rng, 32 * KiB);
  await cache.write(2 * MiB + 8 * KiB, w);
  hold.release();
  const expected = Buffer.from(old);
  w.copy(expected, 8 * KiB);
  // The fill finishes (dropped) before close returns: close waits for fills in flight.
  await cache.close();
  assert.equal(cache.status().counters.fillBytes, 0, 'the fill was dropped');
  const again = await Cache.open(medium, backing, FAST);
  assert.ok((await again.read(2 * MiB, old.length)).equals(expected), 'after reopen the write wins');
  await again.drain({ maxErrors: 0 });
  assert.ok(backing.image().subarray(2 * MiB, 2 * MiB + old.length).equals(expected));
  await again.close();
});

test('a write whose data is in flight is invisible; a fill meanwhile does not hide it once it lands', async () => {
  const rng = seededRng(SEED + 3);
  const medium = new GatedMedium(new StoreMedium(CACHE_SIZE));
  const old = pattern(rng, 64 * KiB);
  const image = Buffer.alloc(16 * MiB);
  old.copy(image, 4 * MiB);
  const backing = new MemoryBacking(image);
  const cache = await Cache.open(medium, backing, FAST);

  const w = pattern(rng, 16 * KiB);
  const hold = medium.hold((_off, len) => len === w.length, ['write']);
  const write = cache.write(4 * MiB + 4 * KiB, w);
  await hold.waitParked(1);
  // Not acknowledged, not readable: the key is not in the index while the data is in flight.
  assert.ok((await cache.read(4 * MiB, old.length)).equals(old));
  await waitFor(() => cache.status().counters.fillBytes === old.length, 'the fill of the whole range');
  hold.release();
  await write;
  const expected = Buffer.from(old);
  w.copy(expected, 4 * KiB);
  assert.ok((await cache.read(4 * MiB, old.length)).equals(expected), 'the write, logged after the fill, wins');
  await cache.close();
  const again = await Cache.open(medium, backing, FAST);
  assert.ok((await again.read(4 * MiB, old.length)).equals(expected), 'and the log agrees after reopen');
  await again.drain({ maxErrors: 0 });
  assert.ok(backing.image().subarray(4 * MiB, 4 * MiB + old.length).equals(expected));
  await again.close();
});

for (const first of ['A', 'B'] as const) {
  test(`overlapping writes in flight together, ${first} landing first: the one that lands last wins, in the index and in the log`, async () => {
    const rng = seededRng(SEED + 4);
    const medium = new GatedMedium(new StoreMedium(CACHE_SIZE));
    const backing = new StoreBacking(16 * MiB);
    const cache = await Cache.open(medium, backing, FAST);
    const a = pattern(rng, 64 * KiB); // at 0
    const b = pattern(rng, 32 * KiB); // at 48 KiB: overlaps a's last 16 KiB
    const holdA = medium.hold((_o, len) => len === a.length, ['write']);
    const holdB = medium.hold((_o, len) => len === b.length, ['write']);
    // One after the other: issued in the same tick, the two would be gathered into one vectored
    // write (DataWriter) and land together.
    const wa = cache.write(0, a);
    await holdA.waitParked(1);
    const wb = cache.write(48 * KiB, b);
    await holdB.waitParked(1);
    if (first === 'A') {
      holdA.release();
      await wa;
      holdB.release();
      await wb;
    } else {
      holdB.release();
      await wb;
      holdA.release();
      await wa;
    }
    const expected = Buffer.alloc(80 * KiB);
    if (first === 'A') {
      a.copy(expected, 0);
      b.copy(expected, 48 * KiB);
    } else {
      b.copy(expected, 48 * KiB);
      a.copy(expected, 0);
    }
    const now = await cache.read(0, expected.length);
    assert.ok(now.equals(expected), 'the write that landed last wins');
    await cache.close();
    const again = await Cache.open(medium, backing, FAST);
    assert.ok((await again.read(0, expected.length)).equals(now), 'replay picks the same winner');
    await again.drain({ maxErrors: 0 });
    const onBacking = Buffer.alloc(expected.length);
    await backing.read(onBacking, 0);
    assert.ok(onBacking.equals(now), 'so does write-back');
    await again.close();
  });
}

test(`many overlapping writes in flight together, completing in random order: read now == read after reopen == backing after drain (seed ${SEED})`, async () => {
  const rng = seededRng(SEED + 5);
  const store = new StoreMedium(CACHE_SIZE);
  const medium = new JitterMedium(store, seededRng(SEED + 6), 6);
  const backing = new StoreBacking(16 * MiB);
  let cache = await Cache.open(medium, backing, FAST);
  const SPAN = 256 * KiB;
  const SECTOR = 512;
  for (let round = 0; round < 6; round++) {
    const base = round * MiB + (round % 2) * (4 * MiB - SPAN / 2); // odd rounds straddle a 4 MiB boundary
    // For each sector, what was there before the round and every value written to it in the round.
    const before = await cache.read(base, SPAN);
    const candidates: Buffer[][] = Array.from({ length: SPAN / SECTOR }, (_, s) => [before.subarray(s * SECTOR, (s + 1) * SECTOR)]);
    const writes: Array<Promise<void>> = [];
    for (let i = 0; i < 40; i++) {
      const len = (1 + rng.int(64)) * SECTOR;
      const off = rng.int((SPAN - len) / SECTOR + 1) * SECTOR;
      const data = pattern(rng, len);
      for (let s = 0; s < len / SECTOR; s++) candidates[off / SECTOR + s]!.push(data.subarray(s * SECTOR, (s + 1) * SECTOR));
      writes.push(cache.write(base + off, data, { fua: rng.next() < 0.1 }));
      if (rng.next() < 0.2) writes.push(cache.read(base + off, len).then(() => undefined));
    }
    await Promise.all(writes);
    const now = await cache.read(base, SPAN);
    for (let s = 0; s < SPAN / SECTOR; s++) {
      const got = now.subarray(s * SECTOR, (s + 1) * SECTOR);
      assert.ok(candidates[s]!.some((c) => c.equals(got)), `round ${round}: sector ${s} holds data no write put there`);
    }
    await cache.close();
    cache = await Cache.open(medium, backing, FAST);
    assert.ok((await cache.read(base, SPAN)).equals(now), `round ${round}: the index and the log agree on every winner`);
    if (round % 2) {
      await cache.drain({ maxErrors: 0 });
      const onBacking = Buffer.alloc(SPAN);
      await backing.read(onBacking, base);
      assert.ok(onBacking.equals(now), `round ${round}: write-back agrees too`);
    }
  }
  await cache.close();
});
