import assert from 'node:assert/strict';
import { test } from 'node:test';
import { MemoryMedium } from '../../src/media/memory.js';
import { pattern } from './helpers.js';

test('round trip, vectored, and reads past the end reject', async () => {
  const m = new MemoryMedium(64 * 1024, 'mem0');
  assert.equal(m.size(), 64 * 1024);
  await m.write([pattern(100, 1), pattern(900, 2)], 5000);
  const b = Buffer.alloc(1000);
  await m.read(b, 5000);
  assert.deepEqual(b, Buffer.concat([pattern(100, 1), pattern(900, 2)]));
  await assert.rejects(m.read(Buffer.alloc(2), 64 * 1024 - 1), /mem0: read of 2 bytes at offset 65535/);
  await assert.rejects(m.write(Buffer.alloc(1), 64 * 1024), /outside the device/);
});

test('reads copy, and an initial image is copied in', async () => {
  const src = pattern(4096, 3);
  const m = new MemoryMedium(src);
  src.fill(0);
  const a = Buffer.alloc(4096);
  await m.read(a, 0);
  assert.deepEqual(a, pattern(4096, 3));
  a.fill(0xff);
  const b = Buffer.alloc(4096);
  await m.read(b, 0);
  assert.deepEqual(b, pattern(4096, 3));
  const img = m.image();
  img.fill(1);
  assert.deepEqual(m.image(), pattern(4096, 3));
});

test('I/O completes on a later turn, as real I/O does', async () => {
  const m = new MemoryMedium(4096);
  let done = false;
  const p = m.write(Buffer.from([7]), 0).then(() => (done = true));
  await Promise.resolve();
  assert.equal(done, false);
  await p;
  await m.close();
  await assert.rejects(m.read(Buffer.alloc(1), 0), /closed/);
});
