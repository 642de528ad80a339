/** The sparse copy-on-write images and the crash-simulating devices built on them. */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { seededRng } from '../../src/media/crash.js';
import { SparseCrashMedium } from '../../src/media/sparse-crash.js';
import { PAGE, PageImage, PageMedium } from '../../src/media/sparse.js';
import { SparseCrashBacking } from './devices.js';
import { readSector, SECTOR, tagData } from './tags.js';

const MiB = 1024 * 1024;

test('a page image is sparse, reads unwritten pages as zeros or its fill, and clones copy-on-write both ways', () => {
  const img = new PageImage(512 * MiB);
  assert.equal(img.pageCount, 0);
  img.write(Buffer.from('hello'), 300 * MiB + PAGE - 2);
  assert.equal(img.pageCount, 2, 'a write across a page boundary takes two pages');
  assert.equal(img.slice(300 * MiB + PAGE - 2, 5).toString(), 'hello');
  assert.ok(img.slice(0, 4096).every((b) => b === 0));
  // Zeros over a page never written keep the image sparse.
  img.write(Buffer.alloc(64 * 1024), 8 * MiB);
  assert.equal(img.pageCount, 2);

  const copy = img.clone();
  copy.write(Buffer.from('HE'), 300 * MiB + PAGE - 2);
  img.write(Buffer.from('xx'), 300 * MiB + PAGE + 1);
  assert.equal(img.slice(300 * MiB + PAGE - 2, 5).toString(), 'helxx');
  assert.equal(copy.slice(300 * MiB + PAGE - 2, 5).toString(), 'HEllo');
  const third = copy.clone();
  copy.write(Buffer.from('!'), 300 * MiB + PAGE - 2);
  assert.equal(third.slice(300 * MiB + PAGE - 2, 1).toString(), 'H');

  const filled = new PageImage(4 * PAGE, (index, page) => page.fill(index + 1));
  assert.deepEqual([...filled.slice(PAGE - 1, 2)], [1, 2]);
  assert.equal(filled.written(1), false);
  filled.write(Buffer.from([9]), PAGE + 5);
  assert.equal(filled.written(1), true);
  assert.deepEqual([...filled.slice(PAGE + 4, 3)], [2, 9, 2], 'a partial write keeps the fill around it');
  assert.throws(() => filled.read(Buffer.alloc(2), 4 * PAGE - 1), RangeError);
});

test('crash images keep synced writes, and of unsynced ones what `keep` says, sector by sector', async () => {
  const m = new SparseCrashMedium(512 * MiB);
  const a = tagData(0, 4096, 1);
  const b = tagData(MiB, 4096, 2);
  await m.write(a, 0);
  await m.sync();
  await m.write(b, MiB);
  assert.equal(m.unsynced, 1);
  const rng = seededRng(5);
  const none = m.crash(rng, { keep: 0 });
  const all = m.crash(rng, { keep: 1 });
  const second = m.crash(rng, { keep: (sector) => (sector === MiB + SECTOR ? 1 : 0) });
  for (const img of [none, all, second]) assert.ok(img.slice(0, 4096).equals(a), 'the synced write is always there');
  assert.ok(none.slice(MiB, 4096).every((x) => x === 0));
  assert.ok(all.slice(MiB, 4096).equals(b));
  const s = second.slice(MiB, 4096);
  assert.equal(readSector(s, 0, MiB).kind, 'zero');
  assert.deepEqual(readSector(s, SECTOR, MiB + SECTOR), { kind: 'tag', id: 2 });
  assert.equal(readSector(s, 2 * SECTOR, MiB + 2 * SECTOR).kind, 'zero');
  // The device itself is unchanged by taking images, and a new device starts from one.
  const again = new SparseCrashMedium(second);
  const buf = Buffer.alloc(4096);
  await again.read(buf, 0);
  assert.ok(buf.equals(a));
  assert.ok(new PageMedium(m.image()).image.slice(MiB, 4096).equals(b));
});

test('onIssue sees each I/O as issued, a write already in flight; kill() fails everything after, parked I/O included', async () => {
  const m = new SparseCrashMedium(512 * MiB);
  const seen: string[] = [];
  let img: PageImage | null = null;
  m.onIssue = (io) => {
    seen.push(`${io.op}@${io.offset}`);
    if (io.op === 'write' && io.offset === 4096) img = m.crash(seededRng(1), { keep: 1 });
  };
  await m.write(Buffer.alloc(512, 1), 0);
  await m.write(Buffer.alloc(512, 2), 4096);
  await m.sync();
  assert.deepEqual(seen, ['write@0', 'write@4096', 'flush@0']);
  assert.equal((img as PageImage | null)?.slice(4096, 1)[0], 2, 'a write in flight may be in the image');

  const hold = m.hold(() => true, ['write']);
  const parked = m.write(Buffer.alloc(512, 3), 8192);
  await hold.waitParked();
  m.kill();
  hold.release();
  await assert.rejects(parked, /EIO/);
  await assert.rejects(m.read(Buffer.alloc(512), 0), /EIO/);
  assert.equal(m.image().slice(8192, 1)[0], 0, 'the parked write changed nothing');

  const b = new SparseCrashBacking(new PageImage(MiB));
  await b.write(Buffer.alloc(512, 7), 0);
  assert.equal(b.crash(seededRng(1), { keep: 0 }).slice(0, 1)[0], 0, 'an unflushed backing write may be lost');
  await b.flush();
  assert.equal(b.crash(seededRng(1), { keep: 0 }).slice(0, 1)[0], 7);
  await assert.rejects(b.read(Buffer.alloc(512), MiB), /outside the device/);
  assert.equal(b.violations.length, 1);
});
