/**
 * Write-back order (spec section 6, steps 1-6), watched from outside: an instrumented backing
 * device records every write and flush, and an instrumented cache device records every kset and
 * every dirty_tail update as it is issued. Then:
 * - the backing writes between two backing flushes are exactly the dirty data of one kset;
 * - ksets are written back in log order, one backing flush each;
 * - the persisted dirty_tail moves only after that flush, to the end of that kset;
 * - at every backing flush the backing image equals the device as it was at a point of the log
 *   (after the kset just written back), computed from the writes the test issued.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { MemoryBacking, type BackingOp } from '../../src/backing/memory.js';
import { Cache } from '../../src/cache/cache.js';
import { loadMeta } from '../../src/cache/meta.js';
import { WB_WRITE_MAX } from '../../src/cache/writeback.js';
import {
  decodeKset,
  decodePosition,
  dirtyTailOffset,
  FormatError,
  formatPosition,
  KEY_FLAG_CLEAN,
  samePosition,
  segmentsFor,
  type Key,
  type Position,
} from '../../src/format/index.js';
import { seededRng, testSeed } from '../helpers/rng.js';
import { CACHE_SIZE, keepProcessAlive, KiB, MiB, ObservedMedium, pattern, StoreMedium, waitFor, logPositionOf } from './helpers.js';

keepProcessAlive();

const BACKING_SIZE = 32 * MiB;
const SECTOR = 512;
const SEED = testSeed('PCACHE_SEED');
console.log(`write-back order test seed ${SEED} (replay with PCACHE_SEED=${SEED})`);

type Event =
  | { t: 'bwrite'; off: number; data: Buffer }
  | { t: 'bflush' }
  | { t: 'dirtyTail'; pos: Position }
  | { t: 'kset'; pos: Position; keys: Key[]; size: number }
  | { t: 'last'; pos: Position; next: number };

const N_SEGS = segmentsFor(CACHE_SIZE);

/** Events are recorded from the first I/O after the cache is open (the format is not of interest). */
function instrument(events: Event[]): { medium: ObservedMedium; backing: MemoryBacking; arm: () => void } {
  let armed = false;
  const nSegs = (): number => N_SEGS;
  const medium = new ObservedMedium(new StoreMedium(CACHE_SIZE), (ev) => {
    if (ev.op !== 'write' || !armed) return;
    if (ev.offset === dirtyTailOffset(0) || ev.offset === dirtyTailOffset(1)) {
      const rec = decodePosition(ev.data, nSegs(), 'dirty_tail');
      assert.ok(!(rec instanceof FormatError), `dirty_tail record written: ${String(rec)}`);
      events.push({ t: 'dirtyTail', pos: { seg: rec.seg, off: rec.off } });
      return;
    }
    const pos = logPositionOf(ev.offset);
    if (!pos || ev.data.length < 24) return;
    const k = decodeKset(ev.data, nSegs());
    if (k instanceof FormatError) return; // cache data, or the zeros that end the log
    events.push(k.last ? { t: 'last', pos, next: k.nextSeg } : { t: 'kset', pos, keys: k.keys, size: k.size });
  });
  const backing = new MemoryBacking(BACKING_SIZE, {
    onOp: (op: BackingOp) => {
      if (!armed) return;
      if (op.op === 'write') events.push({ t: 'bwrite', off: op.offset, data: op.data! });
      else if (op.op === 'flush') events.push({ t: 'bflush' });
    },
  });
  return { medium, backing, arm: () => void (armed = true) };
}

test(`write-back goes kset by kset, in log order, each closed by a backing flush before dirty_tail moves (seed ${SEED})`, async () => {
  const rng = seededRng(SEED);
  const events: Event[] = [];
  const { medium, backing, arm } = instrument(events);
  const cache = await Cache.open(medium, backing, { writebackIntervalMs: 20, ksetCloseMs: 40 });
  arm();

  // Sequential writes (each awaited), so the log holds their keys in exactly this order.
  const writes: Array<{ off: number; data: Buffer }> = [];
  const model = Buffer.alloc(BACKING_SIZE);
  const hot = rng.int((BACKING_SIZE - 2 * MiB) / SECTOR) * SECTOR;
  for (let i = 0; i < 1500; i++) {
    const len = Math.floor(Math.exp(rng.next() * Math.log(512))) * SECTOR; // 512 B .. 256 KiB
    const span = rng.next() < 0.6 ? { base: hot, size: 2 * MiB } : { base: 0, size: BACKING_SIZE };
    const off = Math.min(BACKING_SIZE - len, span.base + rng.int(span.size / SECTOR) * SECTOR);
    const r = rng.next();
    if (r < 0.15) {
      // Reads hit or miss; misses are filled as CLEAN keys, which write-back must not copy.
      assert.ok((await cache.read(off, len)).equals(model.subarray(off, off + len)), `read at ${off}+${len}`);
    } else if (r < 0.2) {
      await cache.writeZeroes(off, len);
      writes.push({ off, data: Buffer.alloc(len) });
      model.fill(0, off, off + len);
    } else {
      const data = pattern(rng, len);
      await cache.write(off, data, { fua: r > 0.97 });
      writes.push({ off, data });
      data.copy(model, off);
    }
    if (rng.next() < 0.04) await cache.flush();
  }
  await cache.drain({ maxErrors: 0 });
  assert.ok(samePosition(cache.dirtyTail, cache.keyHead));
  await cache.close();
  assert.ok(backing.image().equals(model), 'after the drain the backing device equals the model');

  // The log as written, and the device after each of its ksets, from the writes in order.
  const ksets = events.filter((e): e is Extract<Event, { t: 'kset' }> => e.t === 'kset');
  assert.ok(ksets.length > 20, `enough ksets to judge the order (${ksets.length})`);
  assert.ok(ksets.some((k) => k.keys.length > 20), 'some ksets hold many keys');
  let w = 0;
  let within = 0;
  const dirtyRanges: Array<Array<{ from: number; to: number }>> = [];
  for (const k of ksets) {
    const ranges: Array<{ from: number; to: number }> = [];
    for (const key of k.keys) {
      if (key.flags & KEY_FLAG_CLEAN) continue;
      // Keys follow the writes in the order they were made, each write's pieces in order.
      const wr = writes[w];
      assert.ok(wr, `kset at ${formatPosition(k.pos)}: a dirty key beyond the writes made`);
      assert.equal(key.off, wr.off + within, `kset at ${formatPosition(k.pos)}: keys follow the writes in order`);
      within += key.len;
      assert.ok(within <= wr.data.length);
      if (within === wr.data.length) {
        w++;
        within = 0;
      }
      ranges.push({ from: key.off, to: key.off + key.len });
    }
    dirtyRanges.push(ranges);
  }
  assert.equal(w, writes.length, 'every write reached the log');

  // Replay the recorded events against the device images they imply.
  const mirror = Buffer.alloc(BACKING_SIZE); // the backing device, from the writes it received
  const expected = Buffer.alloc(BACKING_SIZE); // the device after ksets 0..flushed-1
  let flushed = 0; // ksets written back so far: one backing flush each, but none for a kset of CLEAN keys only
  let flushes = 0;
  let wi = 0;
  let wOff = 0;
  let lastTail: Position = { seg: 0, off: 0 };
  let sinceFlush: Array<{ from: number; to: number }> = [];
  const applyKset = (i: number): void => {
    for (const key of ksets[i]!.keys) {
      if (key.flags & KEY_FLAG_CLEAN) continue;
      const wr = writes[wi]!;
      wr.data.copy(expected, key.off, wOff, wOff + key.len);
      wOff += key.len;
      if (wOff === wr.data.length) {
        wi++;
        wOff = 0;
      }
    }
  };
  const mergedRanges = (rs: Array<{ from: number; to: number }>): Array<{ from: number; to: number }> => {
    const sorted = [...rs].sort((a, b) => a.from - b.from);
    const out: Array<{ from: number; to: number }> = [];
    for (const r of sorted) {
      const lastR = out[out.length - 1];
      if (lastR && r.from <= lastR.to) lastR.to = Math.max(lastR.to, r.to);
      else out.push({ ...r });
    }
    return out;
  };
  const merged = (rs: Array<{ from: number; to: number }>): string =>
    mergedRanges(rs)
      .map((r) => `${r.from}-${r.to}`)
      .join(',');
  // A kset of CLEAN keys only writes nothing to the backing device and needs no flush: passed at once.
  const skipClean = (): void => {
    while (flushed < ksets.length && dirtyRanges[flushed]!.length === 0) flushed++;
  };
  let mergedWrites = 0;
  for (const e of events) {
    switch (e.t) {
      case 'bwrite': {
        skipClean();
        const k = ksets[flushed];
        assert.ok(k, 'a backing write after the last kset was written back');
        // Keys that meet end to end go out as one write: it lies inside their union.
        assert.ok(
          mergedRanges(dirtyRanges[flushed]!).some((r) => r.from <= e.off && e.off + e.data.length <= r.to),
          `backing write ${e.off}+${e.data.length} lies inside the dirty keys of kset ${flushed} at ${formatPosition(k.pos)}`,
        );
        assert.ok(e.data.length <= WB_WRITE_MAX, `backing write ${e.off}+${e.data.length} is at most ${WB_WRITE_MAX} bytes`);
        if (!dirtyRanges[flushed]!.some((r) => r.from <= e.off && e.off + e.data.length <= r.to)) mergedWrites++;
        e.data.copy(mirror, e.off);
        sinceFlush.push({ from: e.off, to: e.off + e.data.length });
        break;
      }
      case 'bflush': {
        skipClean();
        flushes++;
        assert.ok(flushed < ksets.length, 'one backing flush per kset');
        applyKset(flushed);
        // The writes since the last flush are this kset's dirty data, all of it.
        assert.equal(merged(sinceFlush), merged(dirtyRanges[flushed]!), `kset ${flushed}: the backing writes cover its dirty keys`);
        assert.ok(mirror.equals(expected), `at the flush of kset ${flushed} the backing equals the device after that kset`);
        flushed++;
        sinceFlush = [];
        break;
      }
      case 'dirtyTail': {
        // It moves to the end of the kset just flushed, or of a CLEAN-only kset right after it, or
        // through a LAST kset: never further.
        const endOf = (i: number): Position => (i >= 0 ? { seg: ksets[i]!.pos.seg, off: ksets[i]!.pos.off + ksets[i]!.size } : { seg: 0, off: 0 });
        const endOfDone = endOf(flushed - 1);
        let reached = -1;
        for (let j = flushed - 1; j < ksets.length && (j === flushed - 1 || dirtyRanges[j]!.length === 0); j++) {
          if (samePosition(e.pos, endOf(j))) reached = j;
        }
        const viaLast = events.find((x) => x.t === 'last' && samePosition(x.pos, lastTail));
        const ok = reached >= 0 || (viaLast?.t === 'last' && e.pos.seg === viaLast.next && e.pos.off === 0);
        assert.ok(ok, `dirty_tail moved to ${formatPosition(e.pos)} with ${flushed} ksets flushed (end of the last: ${formatPosition(endOfDone)})`);
        if (reached >= flushed) flushed = reached + 1;
        assert.equal(sinceFlush.length, 0, 'dirty_tail moves only after the flush that ends a kset');
        lastTail = e.pos;
        break;
      }
      default:
        break;
    }
  }
  skipClean();
  assert.equal(flushed, ksets.length, 'every kset was written back');
  const dirtyKsets = dirtyRanges.filter((r) => r.length > 0).length;
  assert.equal(flushes, dirtyKsets, 'each kset with dirty keys had its own flush, and no other flush was issued');
  assert.ok(dirtyKsets < ksets.length, 'some ksets held only CLEAN keys (and cost no flush)');
  assert.ok(mergedWrites > 0, 'keys adjacent on the backing device were merged into one backing write');
  assert.ok(samePosition(lastTail, cache.keyHead), 'the last dirty_tail update reached key_head');
});

test('the persisted dirty_tail stays put while the backing flush of its kset is held', async () => {
  const rng = seededRng(7);
  const events: Event[] = [];
  const { medium, backing, arm } = instrument(events);
  const cache = await Cache.open(medium, backing, { writebackIntervalMs: 20, ksetCloseMs: 1000 });
  arm();
  const before = cache.dirtyTail;

  const flushHold = backing.hold(() => true, ['flush']);
  const data = pattern(rng, 64 * KiB);
  await cache.write(MiB, data);
  await cache.write(3 * MiB, data.subarray(0, 4 * KiB));
  await cache.flush();
  await flushHold.waitParked(1);

  // The kset's data has reached the backing device, but not its flush: dirty_tail has not moved,
  // in memory or on the medium.
  assert.ok(backing.image().subarray(MiB, MiB + data.length).equals(data));
  assert.ok(samePosition(cache.dirtyTail, before));
  const meta = await loadMeta(medium);
  assert.ok(!(meta instanceof FormatError));
  assert.ok(samePosition(meta.dirtyTail, before), `persisted dirty_tail ${formatPosition(meta.dirtyTail)} is still ${formatPosition(before)}`);
  assert.equal(events.filter((e) => e.t === 'dirtyTail').length, 0, 'no dirty_tail update was issued');

  flushHold.release();
  await waitFor(() => samePosition(cache.dirtyTail, cache.keyHead), 'dirty_tail to reach key_head');
  const after = await loadMeta(medium);
  assert.ok(!(after instanceof FormatError));
  assert.ok(samePosition(after.dirtyTail, cache.keyHead), 'once the flush completed, the new dirty_tail is persisted');
  const order = events.filter((e) => e.t === 'bflush' || e.t === 'dirtyTail').map((e) => e.t);
  assert.deepEqual(order, ['bflush', 'dirtyTail']);
  await cache.close();
});
