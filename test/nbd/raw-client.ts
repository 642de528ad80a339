/** Hand-driven protocol steps over a RawConn, so tests can also send what real clients never would. */
import assert from 'node:assert/strict';
import * as P from '../../src/nbd/protocol.js';
import type { RawConn } from './helpers.js';

export interface OptReply {
  option: number;
  type: number;
  data: Buffer;
}

export async function readGreeting(c: RawConn): Promise<number> {
  const g = P.decodeGreeting(await c.read(P.HANDSHAKE_GREETING_SIZE));
  return g.handshakeFlags;
}

export async function readOptReply(c: RawConn): Promise<OptReply> {
  const h = P.decodeOptionReplyHeader(await c.read(P.OPTION_REPLY_HEADER_SIZE));
  const data = await c.read(h.length);
  return { option: h.option, type: h.type, data };
}

/** Sends an option and collects replies up to the final one (ACK or an error). */
export async function option(c: RawConn, opt: number, data?: Buffer): Promise<OptReply[]> {
  c.write(P.encodeOption(opt, data));
  const out: OptReply[] = [];
  for (;;) {
    const r = await readOptReply(c);
    assert.equal(r.option, opt);
    out.push(r);
    if (r.type === P.NBD_REP_ACK || (r.type & P.NBD_REP_FLAG_ERROR) !== 0) return out;
  }
}

export interface Negotiated {
  size: number;
  flags: number;
  structured: boolean;
}

/** Fixed newstyle handshake ending in NBD_OPT_GO. */
export async function handshake(
  c: RawConn,
  opts: { structured?: boolean; name?: string } = {},
): Promise<Negotiated> {
  const hflags = await readGreeting(c);
  assert.equal(hflags, P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES);
  c.write(P.encodeClientFlags(P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES));
  if (opts.structured) {
    const r = await option(c, P.NBD_OPT_STRUCTURED_REPLY);
    assert.equal(r.at(-1)!.type, P.NBD_REP_ACK);
  }
  const replies = await option(c, P.NBD_OPT_GO, P.encodeInfoRequest(opts.name ?? '', [P.NBD_INFO_BLOCK_SIZE]));
  assert.equal(replies.at(-1)!.type, P.NBD_REP_ACK, `GO failed with 0x${replies.at(-1)!.type.toString(16)}`);
  for (const r of replies.slice(0, -1)) {
    const info = P.decodeInfoReply(r.data);
    if (info.type === P.NBD_INFO_EXPORT && 'size' in info) {
      return { size: info.size, flags: info.transmissionFlags, structured: opts.structured === true };
    }
  }
  throw new Error('no NBD_INFO_EXPORT before ACK');
}

export function request(
  c: RawConn,
  type: number,
  handle: bigint,
  offset: number,
  length: number,
  flags = 0,
  payload?: Buffer,
): void {
  const h = P.encodeRequestHeader({ type, handle, offset, length, flags });
  c.write(payload ? Buffer.concat([h, payload]) : h);
}

export interface Reply {
  handle: bigint;
  error: number;
  data?: Buffer;
  message?: string;
}

/**
 * Reads one reply. A simple reply to a read carries data only on success, and only the caller
 * knows it was a read: `readLength` maps a handle to its read length.
 */
export async function readReply(c: RawConn, readLength: (handle: bigint) => number = () => 0): Promise<Reply> {
  const magic = (await c.read(4)).readUInt32BE(0);
  if (magic === P.NBD_SIMPLE_REPLY_MAGIC) {
    const rest = await c.read(12);
    const error = rest.readUInt32BE(0);
    const handle = rest.readBigUInt64BE(4);
    const n = readLength(handle);
    const data = error === 0 && n > 0 ? await c.read(n) : undefined;
    return { handle, error, data };
  }
  assert.equal(magic, P.NBD_STRUCTURED_REPLY_MAGIC, `bad reply magic 0x${magic.toString(16)}`);
  // Gather the chunks of one structured reply (tests never interleave two structured replies).
  let handle: bigint | undefined;
  const parts: Buffer[] = [];
  let error = 0;
  let message: string | undefined;
  let first = true;
  for (;;) {
    if (!first) assert.equal((await c.read(4)).readUInt32BE(0), P.NBD_STRUCTURED_REPLY_MAGIC);
    first = false;
    const h = await c.read(16);
    const flags = h.readUInt16BE(0);
    const type = h.readUInt16BE(2);
    const hd = h.readBigUInt64BE(4);
    const len = h.readUInt32BE(12);
    if (handle === undefined) handle = hd;
    assert.equal(hd, handle);
    const payload = await c.read(len);
    if (type === P.NBD_REPLY_TYPE_OFFSET_DATA) parts.push(payload.subarray(8));
    else if (type & P.NBD_REPLY_TYPE_IS_ERROR) {
      const e = P.decodeErrorChunkPayload(type, payload);
      error = e.error;
      message = e.message;
    } else assert.equal(type, P.NBD_REPLY_TYPE_NONE);
    if (flags & P.NBD_REPLY_FLAG_DONE) break;
  }
  return { handle, error, data: parts.length ? Buffer.concat(parts) : undefined, message };
}
