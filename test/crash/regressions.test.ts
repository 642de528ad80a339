/**
 * Bugs the crash driver found, each replayed deterministically: the driver's seeds depend on
 * timer interleavings, so every test here sets up the same moment with hold gates and chooses
 * exactly which unsynced writes the power cut keeps.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Cache } from '../../src/cache/cache.js';
import { checkCache } from '../../src/cache/check.js';
import { formatCache } from '../../src/cache/format.js';
import { CACHE_CTRL_OFF, dataOffset, dirtyTailOffset, encodePosition, FormatError, keyTailOffset, KSET_HEADER_SIZE, samePosition } from '../../src/format/index.js';
import { seededRng } from '../../src/media/crash.js';
import { SparseCrashMedium } from '../../src/media/sparse-crash.js';
import { PageImage, PageMedium } from '../../src/media/sparse.js';
import { SparseCrashBacking } from './devices.js';
import { readSector, SECTOR, tagData } from './tags.js';

const MiB = 1024 * 1024;
const CACHE_SIZE = 512 * MiB;
const BACKING_SIZE = 16 * MiB;
const isDirtyTail = (off: number): boolean => off >= CACHE_CTRL_OFF + 32 && off < CACHE_CTRL_OFF + 64;

async function until(cond: () => boolean, what: string): Promise<void> {
  const end = Date.now() + 10_000;
  while (!cond()) {
    if (Date.now() > end) assert.fail(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 2));
  }
}

function idOf(buf: Buffer, off: number): string {
  const v = readSector(buf, 0, off);
  return v.kind === 'tag' ? `write ${v.id}` : v.kind;
}

test('write-back syncs a kset before acting on it (crash driver seed 3 lineage 7: "backing newer than the cache")', async () => {
  const medium = new SparseCrashMedium(CACHE_SIZE);
  const backing = new SparseCrashBacking(new PageImage(BACKING_SIZE));
  // ksetCloseMs 1: the timer closes the kset, which writes it without a sync after it.
  const cache = await Cache.open(medium, backing, { writebackIntervalMs: 60_000, ksetCloseMs: 1 });
  await cache.write(0, tagData(0, 4096, 1));
  await cache.flush();
  await until(() => samePosition(cache.dirtyTail, cache.keyHead), 'write-back of the first kset');

  // The second write's kset is closed by the timer; write-back copies it and stops at its
  // dirty_tail update, which we hold: the backing device has write 2, flushed.
  const hold = medium.hold((off) => isDirtyTail(off), ['write']);
  await cache.write(0, tagData(0, 4096, 2));
  // The engine's timers are unref'd: poll, which keeps the process up meanwhile.
  await until(() => hold.parked > 0, 'write-back to reach the dirty_tail update');

  // Two power cuts at this moment: one keeps no unsynced write of the cache device; the other
  // keeps only the dirty_tail update in flight.
  const rng = seededRng(1);
  const lose = medium.crash(rng.bind(null), { keep: 0 });
  const tailOnly = medium.crash(rng.bind(null), { keep: (sector) => (isDirtyTail(sector) ? 1 : 0) });
  const bImg = backing.crash(rng.bind(null), { keep: 0 });
  medium.kill();
  backing.kill();
  hold.release();
  await cache.abandon();

  for (const [name, mImg] of [['keeping nothing unsynced', lose], ['keeping only the dirty_tail update', tailOnly]] as const) {
    const b2 = new SparseCrashBacking(bImg);
    // Without the sync, the second image has a dirty_tail past a kset the crash took: the cache
    // would not open ("dirty_tail ... is not in the log").
    const c2 = await Cache.open(new SparseCrashMedium(mImg), b2, { writebackIntervalMs: 60_000 });
    const view = await c2.read(0, SECTOR);
    // Without the sync, the first image reads write 1 from the log while the backing holds write
    // 2, and draining changes nothing: the backing device would disagree with the cache for good.
    await c2.drain();
    const onBacking = Buffer.alloc(SECTOR);
    b2.peek(onBacking, 0);
    assert.equal(idOf(onBacking, 0), idOf(view, 0), `${name}: after drain the backing device equals the cache`);
    assert.equal(idOf(view, 0), 'write 2', `${name}: the kset write-back copied is durable`);
    await c2.close();
  }
});

test('check: a kset header torn across a sector boundary at the log end is a torn write, not damage (crash driver seed 1 lineage 0 point 8)', async () => {
  // A formatted cache whose log starts 8 bytes before a sector boundary: a kset header there has
  // its crc and key_num in one sector and its magic in the next.
  const base = new PageImage(CACHE_SIZE);
  const fmt = new PageMedium(base);
  assert.ok(!((await formatCache(fmt, {})) instanceof FormatError));
  const at = 64 * SECTOR - 8;
  await fmt.write(Buffer.alloc(KSET_HEADER_SIZE), dataOffset(0, at));
  await fmt.write(encodePosition({ seq: 2, seg: 0, off: at }), keyTailOffset(1));
  await fmt.write(encodePosition({ seq: 2, seg: 0, off: at }), dirtyTailOffset(1));

  const medium = new SparseCrashMedium(base);
  const backing = new SparseCrashBacking(new PageImage(BACKING_SIZE));
  const cache = await Cache.open(medium, backing, { writebackIntervalMs: 60_000, ksetCloseMs: 60_000 });
  await cache.write(0, tagData(0, 4096, 1));
  const ksetAt = dataOffset(0, at);
  const hold = medium.hold((off) => off === ksetAt, ['write']);
  const flushed = cache.flush().catch(() => undefined);
  await hold.waitParked();
  // The sector with the magic lands, the one with crc and key_num does not.
  const magicSector = ksetAt + 8;
  assert.equal(magicSector % SECTOR, 0);
  const img = medium.crash(seededRng(2), { keep: (sector) => (sector === magicSector ? 1 : 0) });
  medium.kill();
  backing.kill();
  hold.release();
  await cache.abandon();
  await flushed;

  const head = img.slice(ksetAt, KSET_HEADER_SIZE);
  assert.equal(head.readUInt32LE(4), 0, 'key_num is the zeros it overwrote');
  assert.equal(head.readBigUInt64LE(8), 0x676894a64e164f1an, 'the magic landed');
  const report = await checkCache(new PageMedium(img.clone()), { backingSize: BACKING_SIZE });
  assert.deepEqual(report.problems, []);
  assert.match(report.warnings.join('\n'), /key_num 0 .*possibly a torn write/);
  const c2 = await Cache.open(new SparseCrashMedium(img), new SparseCrashBacking(new PageImage(BACKING_SIZE)), { writebackIntervalMs: 60_000 });
  assert.deepEqual(c2.keyHead, { seg: 0, off: at });
  await c2.close();
});

test('a kset kept by a power cut whose end marker was lost does not lead replay into an older lap of the log', async () => {
  const medium = new SparseCrashMedium(CACHE_SIZE);
  const backing = new SparseCrashBacking(new PageImage(BACKING_SIZE));
  const cache = await Cache.open(medium, backing, { writebackIntervalMs: 60_000, ksetCloseMs: 60_000 });
  const o = 0;
  // Seven one-key ksets of 64 bytes fill the log up to 448: the next one ends at a sector
  // boundary (512), so its 24-byte end marker lies in the next sector and can be lost alone.
  await cache.write(o, tagData(o, 4096, 1));
  await cache.flush();
  for (let i = 2; i <= 6; i++) {
    await cache.write(i * MiB, tagData(i * MiB, 4096, i));
    await cache.flush();
  }
  await cache.write(o, tagData(o, 4096, 7));
  await cache.flush();
  assert.deepEqual(cache.keyHead, { seg: 0, off: 448 });
  // What an earlier lap of the log through this segment may have left right there: a valid kset
  // whose key points to data still live (here: the first kset, which keyed write 1).
  const first = medium.image().slice(dataOffset(0, 0), 64);
  await medium.write(first, dataOffset(0, 512));
  await medium.sync();
  assert.ok((await checkCache(new PageMedium(medium.image()), { backingSize: BACKING_SIZE })).clean);

  // Write 8; the power fails while its kset is being written: the kset's sector lands, the one
  // holding its end marker does not.
  const ksetAt = dataOffset(0, 448);
  let img: PageImage | null = null;
  medium.onIssue = (io) => {
    if (img || io.op !== 'write' || io.offset > ksetAt || io.offset + io.length <= ksetAt) return;
    img = medium.crash(seededRng(3), { keep: (sector) => (sector === ksetAt - 448 ? 1 : 0) });
    medium.kill();
  };
  await cache.write(o, tagData(o, 4096, 8));
  await cache.flush().catch(() => undefined);
  await cache.abandon();
  assert.ok(img, 'the kset write was seen');
  const after = img as PageImage;
  assert.equal(after.slice(ksetAt + 8, 8).readBigUInt64LE(0), 0x676894a64e164f1an, 'the kset landed');

  const c2 = await Cache.open(new SparseCrashMedium(after), new SparseCrashBacking(new PageImage(BACKING_SIZE)), { writebackIntervalMs: 60_000 });
  const got = idOf(await c2.read(o, SECTOR), o);
  // Write 7 was flushed, write 8 may or may not have made it; write 1 is long overwritten.
  assert.ok(got === 'write 7' || got === 'write 8', `sector 0 reads ${got} after the power cut; the log ends at ${JSON.stringify(c2.keyHead)}`);
  await c2.close();
});
