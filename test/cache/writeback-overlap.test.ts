/**
 * Two shortcuts of write-back, and the order they must keep:
 * - the cache device is synced before a kset is acted on only when no sync has covered that kset
 *   yet (the kset log tracks which ksets a completed sync made durable);
 * - the dirty_tail update of kset K runs while kset K+1 is copied, but a backing write of K+1 that
 *   meets a range K wrote, K+1's backing flush and its own dirty_tail update wait for K's update;
 *   a crash in that window loses nothing, and a failed update stops write-back with dirty_tail put.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import type { BackingDevice } from '../../src/backing/backing.js';
import { MemoryBacking } from '../../src/backing/memory.js';
import { Cache } from '../../src/cache/cache.js';
import { loadMeta } from '../../src/cache/meta.js';
import { decodeKset, dirtyTailOffset, FormatError, formatPosition, samePosition, segmentsFor, type Position } from '../../src/format/index.js';
import type { Medium } from '../../src/media/medium.js';
import { seededRng } from '../helpers/rng.js';
import { CACHE_SIZE, CrashStoreMedium, GatedMedium, keepProcessAlive, KiB, MiB, pattern, StoreMedium, waitFor, logPositionOf } from './helpers.js';

keepProcessAlive();

const BACKING_SIZE = 32 * MiB;
const N_SEGS = segmentsFor(CACHE_SIZE);
const isDirtyTail = (off: number): boolean => off === dirtyTailOffset(0) || off === dirtyTailOffset(1);

type Ev =
  | { t: 'kset'; pos: Position; offs: number[] } // a kset write completed (the backing offsets of its keys)
  | { t: 'dirtyTail' } // a dirty_tail update was issued
  | { t: 'syncStart'; id: number }
  | { t: 'syncDone'; id: number }
  | { t: 'bwrite'; off: number }; // a backing write was issued

/** A cache device that records completed kset writes, dirty_tail updates, and when each sync starts and completes. */
class RecordingMedium implements Medium {
  private syncs = 0;
  constructor(
    readonly inner: Medium,
    private readonly events: Ev[],
  ) {}
  get path(): string {
    return this.inner.path;
  }
  size(): number {
    return this.inner.size();
  }
  read(buf: Buffer, offset: number): Promise<void> {
    return this.inner.read(buf, offset);
  }
  async write(data: Buffer | readonly Buffer[], offset: number): Promise<void> {
    const buf = Buffer.isBuffer(data) ? data : Buffer.concat(data);
    if (isDirtyTail(offset)) this.events.push({ t: 'dirtyTail' });
    await this.inner.write(data, offset);
    const pos = logPositionOf(offset);
    if (!pos || buf.length < 24) return;
    const k = decodeKset(buf, N_SEGS);
    if (k instanceof FormatError || k.last) return; // cache data, or the zeros that end the log
    this.events.push({ t: 'kset', pos, offs: k.keys.map((key) => key.off) });
  }
  async sync(): Promise<void> {
    const id = this.syncs++;
    this.events.push({ t: 'syncStart', id });
    await this.inner.sync();
    this.events.push({ t: 'syncDone', id });
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}

/** A backing device that records each write as it is issued. */
class RecordingBacking implements BackingDevice {
  constructor(
    readonly inner: MemoryBacking,
    private readonly events: Ev[],
  ) {}
  get name(): string {
    return this.inner.name;
  }
  size(): number {
    return this.inner.size();
  }
  read(buf: Buffer, offset: number): Promise<void> {
    return this.inner.read(buf, offset);
  }
  write(data: Buffer, offset: number): Promise<void> {
    this.events.push({ t: 'bwrite', off: offset });
    return this.inner.write(data, offset);
  }
  flush(): Promise<void> {
    return this.inner.flush();
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}

test('write-back syncs the cache device only for a kset no sync has covered, always before its first backing write', async () => {
  const rng = seededRng(11);
  const events: Ev[] = [];
  const medium = new RecordingMedium(new StoreMedium(CACHE_SIZE), events);
  const memBacking = new MemoryBacking(BACKING_SIZE);
  const backing = new RecordingBacking(memBacking, events);
  const cache = await Cache.open(medium, backing, { writebackIntervalMs: 60_000, ksetCloseMs: 30 });

  // K1, K2, K3 are each closed by a FLUSH, whose sync covers them; K4 is closed by the timer and
  // nothing syncs after it. Write-back is parked on K1's backing write meanwhile.
  const writeHold = memBacking.hold(() => true, ['write']);
  const offs = [0, 4 * MiB, 8 * MiB, 12 * MiB];
  const data = offs.map(() => pattern(rng, 16 * KiB));
  for (let i = 0; i < 3; i++) {
    await cache.write(offs[i]!, data[i]!);
    await cache.flush();
    if (i === 0) await writeHold.waitParked(1);
  }
  const head = cache.keyHead;
  await cache.write(offs[3]!, data[3]!);
  await waitFor(() => !samePosition(cache.keyHead, head), 'the timed close of K4');

  const mark = events.length;
  writeHold.release();
  await waitFor(() => samePosition(cache.dirtyTail, cache.keyHead), 'write-back to reach key_head');

  // Every kset: a sync that started after its write completed has completed before its first
  // backing write was issued (a FLUSH's, the next kset's, or write-back's own).
  const ksets = events.filter((e): e is Extract<Ev, { t: 'kset' }> => e.t === 'kset');
  assert.equal(ksets.length, 4);
  for (const [i, k] of ksets.entries()) {
    assert.deepEqual(k.offs, [offs[i]]);
    const written = events.indexOf(k);
    const firstWrite = events.findIndex((e) => e.t === 'bwrite' && e.off === offs[i]);
    assert.ok(firstWrite > written, `K${i + 1} was written back`);
    const covered = events.some((e, at) => e.t === 'syncStart' && at > written && events.findIndex((d) => d.t === 'syncDone' && d.id === e.id) < firstWrite && events.findIndex((d) => d.t === 'syncDone' && d.id === e.id) > at);
    assert.ok(covered, `K${i + 1} at ${formatPosition(k.pos)} was durable before its first backing write`);
  }

  // From K4's write on: one sync per dirty_tail update, and one more for K4 alone (before the
  // kset log tracked durability, K2 and K3 cost a sync each too). K4's may come before the
  // release: write-back reads ksets ahead while K1's backing write is held.
  assert.ok(events.slice(mark).every((e) => e.t !== 'kset'));
  const after = events.slice(events.indexOf(ksets[3]!));
  const syncs = after.filter((e) => e.t === 'syncStart').length;
  const updates = after.filter((e) => e.t === 'dirtyTail').length;
  assert.equal(updates, 4, 'a dirty_tail update per kset');
  assert.equal(syncs, updates + 1, `cache syncs during write-back: ${syncs}, dirty_tail updates: ${updates}`);
  assert.ok(memBacking.image().subarray(offs[3]!, offs[3]! + data[3]!.length).equals(data[3]!));
  await cache.close();
});

/**
 * K1 writes ranges A and B; K2 writes A' (inside A) and C (elsewhere). Write-back of K2 begins
 * while K1's dirty_tail update is parked: C goes to the backing device, A' and K2's flush wait.
 */
async function overlapSetup(): Promise<{
  medium: GatedMedium;
  crashMedium: CrashStoreMedium;
  backing: MemoryBacking;
  cache: Cache;
  model: Buffer;
  k1Start: Position;
  dtHold: ReturnType<GatedMedium['hold']>;
  A: number;
  /** What K1 wrote at A' (where K2 writes later). */
  k1AtA: Buffer;
}> {
  const rng = seededRng(23);
  const crashMedium = new CrashStoreMedium(CACHE_SIZE);
  const medium = new GatedMedium(crashMedium);
  const backing = new MemoryBacking(BACKING_SIZE, { crashable: true });
  const cache = await Cache.open(medium, backing, { writebackIntervalMs: 60_000, ksetCloseMs: 60_000 });
  const model = Buffer.alloc(BACKING_SIZE);
  const put = async (off: number, len: number): Promise<Buffer> => {
    const d = pattern(rng, len);
    await cache.write(off, d);
    d.copy(model, off);
    return d;
  };
  const A = 2 * MiB;
  const B = 6 * MiB;
  const C = 10 * MiB;
  // Both ksets are in the log before write-back copies anything.
  const writeHold = backing.hold(() => true, ['write']);
  const k1Start = cache.keyHead;
  const k1A = await put(A, 64 * KiB);
  const k1B = await put(B, 64 * KiB);
  await cache.flush();
  await writeHold.waitParked(1);
  await put(A + 16 * KiB, 8 * KiB);
  await put(C, 32 * KiB);
  await cache.flush();
  const dtHold = medium.hold((off) => isDirtyTail(off), ['write']);
  writeHold.release();
  await dtHold.waitParked(1);
  // K1 is on the backing device and flushed; its dirty_tail update is parked. K2's write to C
  // needs nothing from it and goes out.
  await waitFor(() => backing.image().subarray(C, C + 32 * KiB).equals(model.subarray(C, C + 32 * KiB)), "K2's write to C during K1's dirty_tail update");
  await sleep(50);
  // K2's write to A' waits for that update: a crash now makes write-back rewrite K1 there.
  assert.ok(backing.image().subarray(A, A + 64 * KiB).equals(k1A), "K1 is on the backing device at A, K2's write to A' is held back");
  assert.ok(backing.image().subarray(B, B + 64 * KiB).equals(k1B), 'K1 is on the backing device at B');
  assert.ok(samePosition(cache.dirtyTail, k1Start), 'dirty_tail (as GC sees it) has not moved while its update is in flight');
  return { medium, crashMedium, backing, cache, model, k1Start, dtHold, A, k1AtA: k1A.subarray(16 * KiB, 24 * KiB) };
}

test("a crash while K1's dirty_tail update overlaps K2's copy loses nothing, and K2 never wrote where K1 did", async () => {
  const rng = seededRng(5);
  const s = await overlapSetup();
  const { A } = s;

  // The power fails now.
  const cacheImage = s.crashMedium.img.crash(rng);
  const backingImage = s.backing.crash(() => rng.next());
  s.dtHold.release();
  await s.cache.abandon();

  assert.ok(backingImage.subarray(A + 16 * KiB, A + 24 * KiB).equals(s.k1AtA), "the backing device's crash image holds K1 at A'");
  const medium = new StoreMedium(cacheImage);
  const meta = await loadMeta(medium);
  assert.ok(!(meta instanceof FormatError));
  assert.ok(samePosition(meta.dirtyTail, s.k1Start), `persisted dirty_tail ${formatPosition(meta.dirtyTail)} is still K1's start`);
  const backing = new MemoryBacking(backingImage);
  const cache = await Cache.open(medium, backing, { writebackIntervalMs: 20, ksetCloseMs: 20 });
  assert.ok((await cache.read(0, BACKING_SIZE)).equals(s.model), 'every flushed write survives');
  await cache.drain({ maxErrors: 0 });
  assert.ok(backing.image().equals(s.model), 'write-back (K1 again, then K2) leaves the backing device equal to the device');
  await cache.close();
});

test("a failed dirty_tail update stops write-back before the next kset's flush; dirty_tail stays, and a retry finishes", async () => {
  const s = await overlapSetup();
  const { A } = s;
  s.medium.gate.failWrites((off) => isDirtyTail(off));
  s.dtHold.release();
  await waitFor(() => s.cache.status().writebackError !== null, 'the failed update to be reported');
  assert.match(s.cache.status().writebackError!, /EIO/);
  assert.ok(samePosition(s.cache.dirtyTail, s.k1Start), 'dirty_tail stays at K1');
  const meta = await loadMeta(s.medium);
  assert.ok(!(meta instanceof FormatError));
  assert.ok(samePosition(meta.dirtyTail, s.k1Start), 'and so does the persisted one');
  assert.ok(s.backing.image().subarray(A + 16 * KiB, A + 24 * KiB).equals(s.k1AtA), "K2's write at A' was not issued");
  s.medium.gate.failWrites(null);
  await s.cache.drain({ maxErrors: 5 });
  assert.ok(s.backing.image().equals(s.model));
  assert.ok(samePosition(s.cache.dirtyTail, s.cache.keyHead));
  await s.cache.close();
});
