import assert from 'node:assert/strict';
import { existsSync, mkdirSync, readFileSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { blockDeviceSize, devMajorMinor } from '../../src/media/blockdev.js';
import { openFileMedium } from '../../src/media/file.js';
import { attachLoop, pattern, scratch } from './helpers.js';

const dir = scratch('file-medium');
const MiB = 1 << 20;

test('round trip, vectored writes, and contents survive a reopen', async () => {
  const path = join(dir, 'rt.img');
  const m = await openFileMedium(path, { create: true, sizeIfCreate: 4 * MiB });
  assert.equal(m.size(), 4 * MiB);
  const a = pattern(8192, 1);
  const parts = [pattern(100, 2), pattern(4000, 3), Buffer.alloc(0), pattern(7, 4)];
  await m.write(a, MiB + 3);
  await m.write(parts, 2 * MiB - 50);
  // More pieces than one pwritev accepts (IOV_MAX is 1024).
  const many = Array.from({ length: 2000 }, (_, i) => pattern(13, i));
  await m.write(many, 3 * MiB);
  await m.sync();
  await m.close();

  const again = await openFileMedium(path);
  const got = Buffer.alloc(a.length);
  await again.read(got, MiB + 3);
  assert.deepEqual(got, a);
  const joined = Buffer.concat(parts);
  const got2 = Buffer.alloc(joined.length);
  await again.read(got2, 2 * MiB - 50);
  assert.deepEqual(got2, joined);
  const got3 = Buffer.alloc(13 * 2000);
  await again.read(got3, 3 * MiB);
  assert.deepEqual(got3, Buffer.concat(many));
  await again.close();
});

test('a short file: reads and writes past the end reject, naming the device and range', async () => {
  const path = join(dir, 'short.img');
  writeFileSync(path, pattern(1000, 9));
  const m = await openFileMedium(path);
  assert.equal(m.size(), 1000);
  const all = Buffer.alloc(1000);
  await m.read(all, 0);
  assert.deepEqual(all, pattern(1000, 9));
  await assert.rejects(m.read(Buffer.alloc(10), 995), (err: Error) => {
    assert.match(err.message, /short\.img/);
    assert.match(err.message, /10 bytes at offset 995/);
    return true;
  });
  await assert.rejects(m.write(Buffer.alloc(2), 999), /short\.img.*outside the device/);
  await assert.rejects(m.write([Buffer.alloc(1), Buffer.alloc(1)], 999), /outside the device/);
  await assert.rejects(m.read(Buffer.alloc(1), -1), /outside the device/);
  await m.close();
  assert.equal(statSync(path).size, 1000, 'a rejected write must not grow the file');
});

test('a file that shrinks under us reads as an error, never as zeros', async () => {
  const path = join(dir, 'shrink.img');
  const m = await openFileMedium(path, { create: true, sizeIfCreate: 8192 });
  truncateSync(path, 4096);
  await assert.rejects(m.read(Buffer.alloc(4096), 4096), /unexpected end of data/);
  await m.close();
});

test('create makes a sparse file; an existing file is opened as it is', async () => {
  const path = join(dir, 'big.img');
  const m = await openFileMedium(path, { create: true, sizeIfCreate: 1024 * MiB });
  assert.equal(m.size(), 1024 * MiB);
  const st = statSync(path);
  assert.equal(st.size, 1024 * MiB);
  assert.ok(st.blocks * 512 < MiB, `expected a sparse file, ${st.blocks} blocks allocated`);
  await m.close();

  const again = await openFileMedium(path, { create: true, sizeIfCreate: 4096 });
  assert.equal(again.size(), 1024 * MiB);
  await again.close();
});

test('creating without a size fails and leaves nothing behind', async () => {
  const path = join(dir, 'nosize.img');
  await assert.rejects(openFileMedium(path, { create: true }), /needs a size/);
  assert.equal(existsSync(path), false);
  await assert.rejects(openFileMedium(join(dir, 'missing.img')), { code: 'ENOENT' });
});

test('read-only and closed media refuse writes', async () => {
  const path = join(dir, 'ro.img');
  writeFileSync(path, pattern(4096, 5));
  const m = await openFileMedium(path, { readOnly: true });
  await assert.rejects(m.write(Buffer.alloc(1), 0), { code: 'EROFS' });
  const b = Buffer.alloc(4096);
  await m.read(b, 0);
  assert.deepEqual(b, pattern(4096, 5));
  await m.close();
  await assert.rejects(m.read(b, 0), /is closed/);
  assert.deepEqual(readFileSync(path), pattern(4096, 5));
});

test('dev_t splits like glibc major()/minor()', () => {
  const makedev = (ma: bigint, mi: bigint) =>
    ((ma & 0xfffn) << 8n) | ((ma & ~0xfffn) << 32n) | (mi & 0xffn) | ((mi & ~0xffn) << 12n);
  assert.deepEqual(devMajorMinor(makedev(8n, 1n)), { major: 8, minor: 1 });
  assert.deepEqual(devMajorMinor(makedev(259n, 0x12345n)), { major: 259, minor: 0x12345 });
  assert.deepEqual(devMajorMinor(makedev(0x1234n, 0xabcdefn)), { major: 0x1234, minor: 0xabcdef });
});

test('block device size comes from sysfs, in 512-byte sectors', async () => {
  const sys = join(dir, 'sys');
  mkdirSync(join(sys, 'dev/block/259:3'), { recursive: true });
  writeFileSync(join(sys, 'dev/block/259:3/size'), '2097152\n');
  assert.equal(await blockDeviceSize((259n << 8n) | 3n, sys), 1024 * MiB);
});

test('a real block device: size from the device, and opened exclusively', async (t) => {
  const img = join(dir, 'loop.img');
  writeFileSync(img, '');
  truncateSync(img, 8 * MiB);
  const loop = attachLoop(img);
  if (!loop) return t.skip('needs root and a free loop device');
  try {
    const m = await openFileMedium(loop.dev);
    assert.equal(m.size(), 8 * MiB);
    await m.write(pattern(4096, 7), 12345);
    await m.sync();
    const b = Buffer.alloc(4096);
    await m.read(b, 12345);
    assert.deepEqual(b, pattern(4096, 7));
    // Without our lock file, O_EXCL still keeps a second opener out.
    await assert.rejects(openFileMedium(loop.dev, { lock: false }), { code: 'EBUSY' });
    await m.close();
  } finally {
    loop.detach();
  }
});
