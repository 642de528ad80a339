import assert from 'node:assert/strict';
import { statSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { openFileBacking } from '../../src/backing/file.js';
import { attachLoop, pattern, scratch } from '../media/helpers.js';

const dir = scratch('file-backing');
const MiB = 1 << 20;

test('round trip across a reopen, with flush', async () => {
  const path = join(dir, 'backing.img');
  const b = await openFileBacking(path, { create: true, size: 16 * MiB });
  assert.equal(b.name, path);
  assert.equal(b.size(), 16 * MiB);
  assert.ok(statSync(path).blocks * 512 < MiB, 'created sparse');
  await b.write(pattern(65536, 1), 5 * MiB + 7);
  await b.flush();
  await b.close();
  const again = await openFileBacking(path);
  const got = Buffer.alloc(65536);
  await again.read(got, 5 * MiB + 7);
  assert.deepEqual(got, pattern(65536, 1));
  // Never written: a sparse hole reads as zeros.
  await again.read(got, 0);
  assert.ok(got.every((x) => x === 0));
  await again.close();
});

test('out-of-range requests reject, naming the device', async () => {
  const path = join(dir, 'small.img');
  writeFileSync(path, pattern(3000, 2));
  const b = await openFileBacking(path);
  await assert.rejects(b.read(Buffer.alloc(100), 2950), (err: Error) => {
    assert.match(err.message, /backing device .*small\.img: read of 100 bytes at offset 2950/);
    return true;
  });
  await assert.rejects(b.write(Buffer.alloc(1), 3000), /small\.img: write of 1 bytes at offset 3000/);
  await assert.rejects(b.read(Buffer.alloc(1), 0.5), /outside the device/);
  await b.close();
  assert.equal(statSync(path).size, 3000);
  await assert.rejects(openFileBacking(join(dir, 'absent.img')), { code: 'ENOENT' });
  await assert.rejects(openFileBacking(join(dir, 'nosize.img'), { create: true }), /needs a size/);
});

test('a block device backing takes its size from the device', async (t) => {
  const img = join(dir, 'loop.img');
  writeFileSync(img, '');
  truncateSync(img, 4 * MiB);
  const loop = attachLoop(img);
  if (!loop) return t.skip('needs root and a free loop device');
  try {
    const b = await openFileBacking(loop.dev);
    assert.equal(b.size(), 4 * MiB);
    assert.equal(b.isBlockDevice, true);
    await b.write(pattern(4096, 3), 4 * MiB - 4096);
    await b.flush();
    const got = Buffer.alloc(4096);
    await b.read(got, 4 * MiB - 4096);
    assert.deepEqual(got, pattern(4096, 3));
    await assert.rejects(b.read(Buffer.alloc(1), 4 * MiB), /outside the device/);
    await b.close();
  } finally {
    loop.detach();
  }
});
