import assert from 'node:assert/strict';
import { test } from 'node:test';
import { CrashMedium, seededRng } from '../../src/media/crash.js';
import { pattern } from './helpers.js';

const SIZE = 64 * 1024;

function sectorsEqual(img: Buffer, offset: number, data: Buffer): boolean[] {
  const out: boolean[] = [];
  for (let i = 0; i < data.length; i += 512) {
    out.push(img.subarray(offset + i, offset + i + 512).equals(data.subarray(i, i + 512)));
  }
  return out;
}

test('synced writes always survive a crash; unsynced ones may, whole or torn', async () => {
  const m = new CrashMedium(SIZE);
  const synced = pattern(4096, 1);
  const unsynced = pattern(1024, 2);
  await m.write(synced, 0);
  await m.sync();
  await m.write(unsynced, 8192);
  const rng = seededRng(42);
  const seen = new Set<string>();
  for (let i = 0; i < 200; i++) {
    const img = m.crash(rng);
    assert.deepEqual(img.subarray(0, 4096), synced);
    const kept = sectorsEqual(img, 8192, unsynced);
    // A sector not kept is still as it was: zeros, never anything else.
    kept.forEach((k, s) => k || assert.ok(img.subarray(8192 + s * 512, 8192 + (s + 1) * 512).every((x) => x === 0)));
    seen.add(kept.every(Boolean) ? 'all' : kept.some(Boolean) ? 'torn' : 'none');
  }
  assert.deepEqual([...seen].sort(), ['all', 'none', 'torn']);
  // Reads see everything completed, synced or not.
  const b = Buffer.alloc(1024);
  await m.read(b, 8192);
  assert.deepEqual(b, unsynced);
});

test('an unsynced overwrite leaves each sector old or new, and a sync makes it stick', async () => {
  const m = new CrashMedium(SIZE);
  const v1 = pattern(2048, 1);
  const v2 = pattern(2048, 2);
  const v3 = pattern(2048, 3);
  await m.write(v1, 1024);
  await m.sync();
  await m.write(v2, 1024);
  await m.write(v3, 1024);
  const rng = seededRng(7);
  const winners = new Set<number>();
  for (let i = 0; i < 200; i++) {
    const img = m.crash(rng);
    for (let s = 0; s < 4; s++) {
      const sector = img.subarray(1024 + s * 512, 1024 + (s + 1) * 512);
      const which = [v1, v2, v3].findIndex((v) => sector.equals(v.subarray(s * 512, (s + 1) * 512)));
      assert.notEqual(which, -1);
      winners.add(which);
    }
  }
  assert.deepEqual([...winners].sort(), [0, 1, 2]);
  await m.sync();
  for (let i = 0; i < 20; i++) assert.deepEqual(m.crash(rng).subarray(1024, 3072), v3);
});

test('a sync covers only writes completed before it began', async () => {
  const m = new CrashMedium(SIZE);
  const h = m.hold((off) => off === 4096);
  const w = m.write(pattern(512, 5), 4096);
  await h.waitParked();
  const s = m.sync();
  h.release();
  await w;
  await s;
  const none = () => 0.99; // keeps no unsynced sector
  assert.ok(m.crash(none).subarray(4096, 4608).every((x) => x === 0));
  await m.sync();
  assert.deepEqual(m.crash(none).subarray(4096, 4608), pattern(512, 5));
});

test('a write still in flight may or may not be in the crash image', async () => {
  const m = new CrashMedium(SIZE);
  const h = m.hold(() => true);
  const w = m.write(pattern(512, 6), 0);
  await h.waitParked();
  assert.deepEqual(m.crash(() => 0).subarray(0, 512), pattern(512, 6));
  assert.ok(m.crash(() => 0.99).subarray(0, 512).every((x) => x === 0));
  h.release();
  await w;
});

test('injected faults reject with EIO and change nothing', async () => {
  const m = new CrashMedium(SIZE, 'faulty');
  m.failWrites((off, len) => off < 8192 && off + len > 4096);
  await assert.rejects(m.write(pattern(512, 1), 4096), (err: NodeJS.ErrnoException) => {
    assert.equal(err.code, 'EIO');
    assert.match(err.message, /faulty/);
    return true;
  });
  await m.write(pattern(512, 2), 0);
  m.failWrites(null);
  assert.ok(m.image().subarray(4096, 4608).every((x) => x === 0));
  assert.ok(m.crash(() => 0).subarray(4096, 4608).every((x) => x === 0), 'a failed write is not even pending');

  m.failReads((off) => off === 0);
  await assert.rejects(m.read(Buffer.alloc(512), 0), { code: 'EIO' });
  await m.read(Buffer.alloc(512), 512);
  m.failReads(null);

  m.failSyncs(true);
  await assert.rejects(m.sync(), { code: 'EIO' });
  assert.ok(m.crash(() => 0.99).subarray(0, 512).every((x) => x === 0), 'a failed sync made nothing durable');
  m.failSyncs(false);
  await m.sync();
  assert.deepEqual(m.crash(() => 0.99).subarray(0, 512), pattern(512, 2));
});

test('hold parks matching I/O until release, forcing the order of overlapping writes', async () => {
  const m = new CrashMedium(SIZE);
  const h = m.hold((off) => off === 0, ['write']);
  const order: string[] = [];
  const first = m.write(Buffer.alloc(512, 1), 0).then(() => order.push('first'));
  await h.waitParked(1);
  assert.equal(h.parked, 1);
  const second = m.write(Buffer.alloc(512, 2), 0).then(() => order.push('second'));
  await h.waitParked(2);
  // Unmatched I/O goes through while the hold is on.
  await m.write(Buffer.alloc(512, 3), 512);
  const b = Buffer.alloc(1024);
  await m.read(b, 0);
  assert.ok(b.subarray(0, 512).every((x) => x === 0), 'parked writes have not landed');
  assert.ok(b.subarray(512).every((x) => x === 3));
  h.release();
  await Promise.all([first, second]);
  assert.deepEqual(order, ['first', 'second']);
  await m.read(b, 0);
  assert.ok(b.subarray(0, 512).every((x) => x === 2));
  // After release, matching I/O is no longer parked.
  await m.write(Buffer.alloc(512, 4), 0);
});

test('a parked read sees the data at the time it completes', async () => {
  const m = new CrashMedium(SIZE);
  const h = m.hold(() => true, ['read']);
  const b = Buffer.alloc(512);
  const r = m.read(b, 0);
  await h.waitParked();
  await m.write(Buffer.alloc(512, 9), 0);
  h.release();
  await r;
  assert.ok(b.every((x) => x === 9));
});

test('a parked sync can be released into a fault', async () => {
  const m = new CrashMedium(SIZE);
  await m.write(Buffer.alloc(512, 1), 0);
  const h = m.hold(() => true, ['flush']);
  const s = m.sync();
  await h.waitParked();
  m.failSyncs(true);
  h.release();
  await assert.rejects(s, { code: 'EIO' });
});
