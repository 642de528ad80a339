import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as P from '../../src/nbd/protocol.js';

test('ByteQueue returns views inside one chunk and copies only across chunks', () => {
  const q = new P.ByteQueue();
  const a = Buffer.from([1, 2, 3, 4, 5]);
  const b = Buffer.from([6, 7, 8]);
  q.push(a);
  q.push(Buffer.alloc(0));
  q.push(b);
  assert.equal(q.length, 8);
  assert.equal(q.peekUInt32BE(3), 0x04050607);
  const first = q.take(2);
  assert.deepEqual([...first], [1, 2]);
  const across = q.take(4);
  assert.deepEqual([...across], [3, 4, 5, 6]);
  a[0] = 99;
  a[2] = 98;
  assert.equal(first[0], 99, 'a read inside one chunk is a view of it');
  assert.equal(across[0], 3, 'a read across chunks is a copy');
  assert.equal(q.skip(10), 2);
  assert.equal(q.length, 0);
  assert.throws(() => q.take(1), RangeError);
  assert.equal(q.take(0).length, 0);
});

test('ByteQueue survives many small chunks (compaction)', () => {
  const q = new P.ByteQueue();
  let expect = 0;
  let next = 0;
  for (let i = 0; i < 1000; i++) {
    q.push(Buffer.from([next++ & 0xff, next++ & 0xff, next++ & 0xff]));
    if (i % 2 === 1) {
      const got = q.take(5);
      for (const v of got) assert.equal(v, expect++ & 0xff);
    }
  }
  assert.equal(q.length, 3000 - 2500);
  const rest = q.take(q.length);
  for (const v of rest) assert.equal(v, expect++ & 0xff);
});

test('request header round trip and magic check', () => {
  const req = { flags: P.NBD_CMD_FLAG_FUA, type: P.NBD_CMD_WRITE, handle: 0x0102030405060708n, offset: 2 ** 40 + 512, length: 65536 };
  const b = P.encodeRequestHeader(req);
  assert.equal(b.length, P.REQUEST_HEADER_SIZE);
  assert.equal(b.readUInt32BE(0), 0x25609513);
  assert.ok(P.requestMagicOk(b));
  assert.deepEqual(P.decodeRequestHeader(b), req);
  b[0] = 0;
  assert.ok(!P.requestMagicOk(b));
  assert.throws(() => P.encodeRequestHeader({ ...req, offset: -1 }), RangeError);
});

test('handshake messages use the documented magics and layout', () => {
  const g = P.encodeGreeting(P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES);
  assert.equal(g.toString('latin1', 0, 16), 'NBDMAGICIHAVEOPT');
  assert.equal(g.readUInt16BE(16), 3);
  assert.deepEqual(P.decodeGreeting(g), { handshakeFlags: 3 });
  const old = Buffer.from(g);
  old.writeBigUInt64BE(P.NBD_CLISERV_MAGIC, 8);
  assert.throws(() => P.decodeGreeting(old), /oldstyle/);

  const opt = P.encodeOption(P.NBD_OPT_GO, Buffer.from('abc'));
  assert.deepEqual(P.decodeOptionHeader(opt), { option: 7, length: 3 });
  assert.equal(opt.toString('latin1', 16), 'abc');

  const rep = P.encodeOptionReply(P.NBD_OPT_LIST, P.NBD_REP_ERR_UNSUP, Buffer.from('no'));
  assert.equal(rep.readBigUInt64BE(0), 0x3e889045565a9n);
  assert.deepEqual(P.decodeOptionReplyHeader(rep), { option: 3, type: 0x80000001, length: 2 });

  const en = P.encodeExportNameReply(1 << 20, 0x14d, false);
  assert.equal(en.length, 134);
  assert.deepEqual(P.decodeExportNameReply(en), { size: 1 << 20, transmissionFlags: 0x14d });
  assert.equal(P.encodeExportNameReply(1 << 20, 1, true).length, 10);
});

test('INFO/GO request parsing rejects inconsistent lengths', () => {
  const ok = P.encodeInfoRequest('name', [P.NBD_INFO_NAME, P.NBD_INFO_BLOCK_SIZE]);
  assert.deepEqual(P.decodeInfoRequest(ok), { name: 'name', requests: [1, 3] });
  assert.equal(P.decodeInfoRequest(ok.subarray(0, ok.length - 1)), null);
  assert.equal(P.decodeInfoRequest(Buffer.concat([ok, Buffer.alloc(1)])), null);
  const tooLong = Buffer.from(ok);
  tooLong.writeUInt32BE(1000, 0);
  assert.equal(P.decodeInfoRequest(tooLong), null);
  assert.equal(P.decodeInfoRequest(Buffer.alloc(3)), null);

  assert.deepEqual(P.decodeInfoReply(P.encodeInfoExport(4096, 1)), { type: 0, size: 4096, transmissionFlags: 1 });
  assert.deepEqual(P.decodeInfoReply(P.encodeInfoBlockSize(512, 4096, 1 << 25)), {
    type: 3, minimum: 512, preferred: 4096, maximum: 1 << 25,
  });
  assert.deepEqual(P.decodeInfoReply(P.encodeInfoString(P.NBD_INFO_DESCRIPTION, 'héllo')), { type: 2, description: 'héllo' });
  assert.deepEqual(P.decodeRepServer(P.encodeRepServer('a', 'desc')), { name: 'a', description: 'desc' });
});

test('reply encoders', () => {
  const s = P.encodeSimpleReply(9n, P.NBD_EIO);
  assert.deepEqual([s.readUInt32BE(0), s.readUInt32BE(4), s.readBigUInt64BE(8)], [0x67446698, 5, 9n]);

  const d = P.encodeOffsetDataHeader(7n, P.NBD_REPLY_FLAG_DONE, 1024, 4096);
  assert.equal(d.length, 28);
  assert.deepEqual(
    [d.readUInt32BE(0), d.readUInt16BE(4), d.readUInt16BE(6), d.readBigUInt64BE(8), d.readUInt32BE(16), P.readU64(d, 20)],
    [0x668e33ef, 1, P.NBD_REPLY_TYPE_OFFSET_DATA, 7n, 4096 + 8, 1024],
  );

  const n = P.encodeNoneChunk(3n);
  assert.deepEqual([n.length, n.readUInt16BE(4), n.readUInt16BE(6), n.readUInt32BE(16)], [20, 1, 0, 0]);

  const e = P.encodeErrorChunk(3n, P.NBD_REPLY_FLAG_DONE, P.NBD_EINVAL, 'bad');
  assert.equal(e.readUInt16BE(6), 0x8001);
  assert.equal(e.readUInt32BE(16), 9);
  assert.deepEqual(P.decodeErrorChunkPayload(0x8001, e.subarray(20)), { error: 22, message: 'bad' });
  assert.throws(() => P.decodeErrorChunkPayload(0x8001, Buffer.from([0, 0, 0, 5, 0, 9, 1])), P.ProtocolError);
  const long = P.encodeErrorChunk(1n, 0, 5, 'x'.repeat(10_000));
  assert.equal(long.readUInt16BE(24), 4096, 'messages are capped at the 4096-byte string limit');
});

test('device errors map to protocol errors; unknown ones become EIO', () => {
  const err = (code?: string) => Object.assign(new Error('x'), code ? { code } : {});
  assert.equal(P.errnoFromError(err('ENOSPC')), P.NBD_ENOSPC);
  assert.equal(P.errnoFromError(err('EDQUOT')), P.NBD_ENOSPC);
  assert.equal(P.errnoFromError(err('EFBIG')), P.NBD_ENOSPC);
  assert.equal(P.errnoFromError(err('EROFS')), P.NBD_EPERM);
  assert.equal(P.errnoFromError(err('EINVAL')), P.NBD_EINVAL);
  assert.equal(P.errnoFromError(err('ENOMEM')), P.NBD_ENOMEM);
  assert.equal(P.errnoFromError(err('ESHUTDOWN')), P.NBD_ESHUTDOWN);
  assert.equal(P.errnoFromError(err('EIO')), P.NBD_EIO);
  assert.equal(P.errnoFromError(err('ENOENT')), P.NBD_EIO);
  assert.equal(P.errnoFromError(err()), P.NBD_EIO);
  assert.equal(P.errnoFromError('string'), P.NBD_EIO);
  assert.equal(P.errnoFromError(null), P.NBD_EIO);
  const e = new P.NbdRequestError(P.NBD_ENOSPC, 'disk full');
  assert.equal(e.code, 'ENOSPC');
  assert.match(e.message, /ENOSPC: disk full/);
});

test('u64 helpers', () => {
  const b = Buffer.alloc(8);
  P.writeU64(b, Number.MAX_SAFE_INTEGER, 0);
  assert.equal(P.readU64(b, 0), Number.MAX_SAFE_INTEGER);
  assert.equal(b.readBigUInt64BE(0), BigInt(Number.MAX_SAFE_INTEGER));
  assert.throws(() => P.writeU64(b, 2 ** 53, 0), RangeError);
  assert.throws(() => P.writeU64(b, 1.5, 0), RangeError);
});
