import assert from 'node:assert/strict';
import { test } from 'node:test';
import { MemoryBacking, type BackingOp } from '../../src/backing/memory.js';
import { seededRng } from '../../src/media/crash.js';
import { pattern } from '../media/helpers.js';

test('onOp reports operations in completion order, with a copy of written data', async () => {
  const ops: BackingOp[] = [];
  const b = new MemoryBacking(1 << 20, { name: 'slow', onOp: (op) => ops.push(op) });
  const h = b.hold((off) => off === 0, ['write']);
  const data = pattern(4096, 1);
  const first = b.write(data, 0);
  await h.waitParked();
  await b.write(pattern(512, 2), 8192);
  await b.read(Buffer.alloc(100), 8192);
  h.release();
  await first;
  data.fill(0); // the report must not alias the caller's buffer
  await b.flush();
  assert.deepEqual(
    ops.map((o) => [o.op, o.offset, o.length]),
    [
      ['write', 8192, 512],
      ['read', 8192, 100],
      ['write', 0, 4096],
      ['flush', 0, 0],
    ],
  );
  assert.deepEqual(ops[2]!.data, pattern(4096, 1));
  assert.equal(ops[1]!.data, undefined);
});

test('reads copy, image() is a copy, and out-of-range requests reject', async () => {
  const b = new MemoryBacking(pattern(8192, 4));
  const r = Buffer.alloc(8192);
  await b.read(r, 0);
  r.fill(0);
  b.image().fill(0);
  assert.deepEqual(b.image(), pattern(8192, 4));
  await assert.rejects(b.read(Buffer.alloc(2), 8191), /memory: read of 2 bytes at offset 8191/);
  await assert.rejects(b.write(Buffer.alloc(1), -1), /outside the device/);
});

test('faults reject with EIO and do not change the image', async () => {
  const b = new MemoryBacking(8192);
  b.failWrites(() => true);
  await assert.rejects(b.write(Buffer.alloc(512, 1), 0), { code: 'EIO' });
  assert.ok(b.image().every((x) => x === 0));
  b.failWrites(null);
  b.failReads((off, len) => off + len > 4096);
  await assert.rejects(b.read(Buffer.alloc(512), 4000), { code: 'EIO' });
  await b.read(Buffer.alloc(512), 0);
  b.failFlushes(true);
  await assert.rejects(b.flush(), { code: 'EIO' });
});

test('crash mode: flushed writes survive, unflushed ones may not', async () => {
  const b = new MemoryBacking(1 << 16, { crashable: true });
  await b.write(pattern(1024, 1), 0);
  await b.flush();
  await b.write(pattern(1024, 2), 4096);
  const rng = seededRng(3);
  const outcomes = new Set<string>();
  for (let i = 0; i < 100; i++) {
    const img = b.crash(rng);
    assert.deepEqual(img.subarray(0, 1024), pattern(1024, 1));
    const tail = img.subarray(4096, 5120);
    outcomes.add(tail.equals(pattern(1024, 2)) ? 'kept' : tail.every((x) => x === 0) ? 'lost' : 'torn');
  }
  assert.deepEqual([...outcomes].sort(), ['kept', 'lost', 'torn']);
  assert.throws(() => new MemoryBacking(512).crash(rng), /crash tracking/);
});
