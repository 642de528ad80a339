/**
 * A failing backing device (issue 6, item 4), through a fault-injecting in-memory backing device:
 * reads, writes and flushes fail at 50% for a while, then the device heals. In writeback mode the
 * writes and flushes of the client keep succeeding; reads that need the backing device fail with
 * EIO, never return zeros or stale data; write-back retries, never skips a kset, and once the
 * device heals it drains everything: the backing device then equals what was written.
 *
 * (The same through nbdkit's error filter needs the NBD backing device; see RELIABILITY.md.)
 * PCACHE_SEED replays the randomized test.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Cache } from '../../src/cache/cache.js';
import { checkCache } from '../../src/cache/check.js';
import { seededRng as mediaRng } from '../../src/media/crash.js';
import { SparseCrashMedium } from '../../src/media/sparse-crash.js';
import { PageImage, PageMedium } from '../../src/media/sparse.js';
import { seededRng, testSeed } from '../helpers/rng.js';
import { SparseCrashBacking } from './devices.js';
import { assertIoError, PossibleValues, sectorRuns } from './faults.js';
import { SECTOR, tagData, tagSector } from './tags.js';

const MiB = 1024 * 1024;
const CACHE_SIZE = 512 * MiB;
const BACKING_SIZE = 16 * MiB;
const SEED = testSeed('PCACHE_SEED');
console.log(`failing backing test seed ${SEED} (replay with PCACHE_SEED=${SEED})`);

function taggedBacking(): PageImage {
  return new PageImage(BACKING_SIZE, (index, page) => {
    for (let at = 0; at < page.length; at += SECTOR) tagSector(page, at, index * page.length + at, 0);
  });
}

/** Compare the whole backing device with the model: written sectors exactly, the rest as initial. */
function assertBackingEquals(backing: SparseCrashBacking, pv: PossibleValues, what: string): void {
  const chunk = Buffer.alloc(MiB);
  for (let off = 0; off < BACKING_SIZE; off += chunk.length) {
    backing.peek(chunk, off);
    pv.readBack(off, chunk, what);
  }
}

test(`a backing device failing 50% of its I/O, then healing: writes succeed, reads fail cleanly, write-back drains it all (seed ${SEED})`, async (t) => {
  const rng = seededRng(SEED);
  const faults = seededRng(SEED ^ 0xbad);
  const medium = new SparseCrashMedium(CACHE_SIZE);
  const backing = new SparseCrashBacking(taggedBacking());
  const cache = await Cache.open(medium, backing, { gcPercent: 10, writebackIntervalMs: 5, ksetCloseMs: 5 });
  const pv = new PossibleValues();
  const n = { writes: 0, flushes: 0, reads: 0, failedReads: 0, missReadsFailed: 0 };

  const step = async (failing: boolean): Promise<void> => {
    const batch: Array<Promise<void>> = [];
    const busy: Array<{ off: number; len: number }> = [];
    for (let i = 0, want = 1 + rng.int(5); i < want; i++) {
      const r = rng.next();
      if (r < 0.1) {
        n.flushes++;
        // FLUSH concerns the cache device only: it must succeed whatever the backing device does.
        batch.push(cache.flush());
        continue;
      }
      const len = (1 + rng.int(rng.next() < 0.1 ? 256 : 16)) * SECTOR;
      const off = Math.min(BACKING_SIZE - len, rng.int(BACKING_SIZE / SECTOR) * SECTOR);
      if (busy.some((b) => off < b.off + b.len && b.off < off + len)) continue;
      busy.push({ off, len });
      if (r < 0.55) {
        const id = pv.nextId++;
        n.writes++;
        batch.push(cache.write(off, tagData(off, len, id), { fua: r > 0.5 }).then(() => pv.wrote(off, len, id, true)));
      } else {
        n.reads++;
        batch.push(
          cache.read(off, len).then(
            (buf) => pv.readBack(off, buf, `read ${off}+${len}`),
            (err) => {
              assert.ok(failing, `a read failed while the backing device was healthy: ${String(err)}`);
              assertIoError(err, `read ${off}+${len}`);
              n.failedReads++;
            },
          ),
        );
      }
    }
    await Promise.all(batch);
  };

  for (let i = 0; i < 20; i++) await step(false);
  const p = (): boolean => faults.next() < 0.5;
  backing.failReads(() => p());
  backing.failWrites(() => p());
  backing.failFlushes(true);
  for (let i = 0; i < 80; i++) {
    if (i % 10 === 5) backing.failFlushes(faults.next() < 0.5);
    await step(true);
  }
  // A read that needs the backing device while every backing read fails: an error, never zeros.
  backing.failReads(() => true);
  const never = (() => {
    for (let s = 0; s < BACKING_SIZE / SECTOR; s += 8) if (!pv.written().includes(s)) return s * SECTOR;
    return 0;
  })();
  await assert.rejects(cache.read(never, 4096), (err) => (assertIoError(err, 'a miss'), true));
  n.missReadsFailed++;
  const st = cache.status();
  t.diagnostic(`failing: ${n.writes} writes, ${n.flushes} flushes, all succeeded; ${n.reads} reads, ${n.failedReads} failed; write-back errors ${st.counters.writebackErrors}: ${st.writebackError}`);
  assert.ok(n.failedReads > 0, 'some reads needed the failing backing device');
  assert.ok(st.counters.writebackErrors > 0, 'write-back met the failures');
  assert.ok(st.dirtyBytes > 0, 'dirty data waits in the cache');

  // Healed: everything drains, in order, and the backing device equals what was written.
  backing.failReads(null);
  backing.failWrites(null);
  backing.failFlushes(false);
  for (let i = 0; i < 20; i++) await step(false);
  const before = cache.status().counters.writtenBackKsets;
  await cache.drain({ maxErrors: 1000 });
  t.diagnostic(`healed: ${cache.status().counters.writtenBackKsets - before} ksets written back by the drain`);
  for (const r of sectorRuns(pv.written())) pv.readBack(r.off, await cache.read(r.off, r.len), 'after healing');
  assert.deepEqual(pv.uncertain(), []);
  assertBackingEquals(backing, pv, 'the backing device after the drain');

  // And a power cut now loses nothing: the log and the backing device agree.
  await cache.flush();
  const mImg = medium.crash(mediaRng(1), { keep: 0 });
  const bImg = backing.crash(mediaRng(2), { keep: 0 });
  medium.kill();
  backing.kill();
  await cache.abandon();
  const report = await checkCache(new PageMedium(mImg.clone()), { backingSize: BACKING_SIZE });
  assert.deepEqual(report.problems, []);
  assert.equal(report.dirtyBytes, 0);
  const b2 = new SparseCrashBacking(bImg);
  assertBackingEquals(b2, pv, 'the backing device after the power cut');
  const c2 = await Cache.open(new SparseCrashMedium(mImg), b2, {});
  for (const r of sectorRuns(pv.written())) pv.readBack(r.off, await c2.read(r.off, r.len), 'reopened');
  await c2.close();
});

test('write-back never skips a kset: a backing device failing one kset\'s writes holds dirty_tail there until it heals', async () => {
  const medium = new SparseCrashMedium(CACHE_SIZE);
  const backing = new SparseCrashBacking(taggedBacking());
  const cache = await Cache.open(medium, backing, { writebackIntervalMs: 5, ksetCloseMs: 60_000 });
  const pv = new PossibleValues();
  // Three ksets; the backing device fails every write to the middle one's range. Both the fault
  // and the starting tail are set before the first write: write-back runs every 5 ms and may
  // take the first kset before the loop ends.
  backing.failWrites((off) => off >= MiB && off < MiB + 8192);
  const start = cache.dirtyTail;
  for (const [i, off] of [0, MiB, 2 * MiB].entries()) {
    await cache.write(off, tagData(off, 8192, i + 1));
    pv.wrote(off, 8192, i + 1, true);
    await cache.flush();
  }
  const deadline = Date.now() + 10_000;
  while (cache.status().counters.writebackErrors < 2 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5));
  assert.ok(cache.status().counters.writebackErrors >= 2, 'write-back retried');
  assert.notDeepEqual(cache.dirtyTail, cache.keyHead, 'dirty_tail waits at the failing kset');
  assert.notDeepEqual(cache.dirtyTail, start, 'the kset before it was written back');
  // The third kset's data has not reached the backing device: write-back goes in log order.
  const third = Buffer.alloc(SECTOR);
  backing.peek(third, 2 * MiB);
  assert.equal(third.readUInt32LE(4), 0, 'the kset after the failing one is not written back');
  backing.failWrites(null);
  await cache.drain({ maxErrors: 1000 });
  assertBackingEquals(backing, pv, 'after healing');
  await cache.close();
});
