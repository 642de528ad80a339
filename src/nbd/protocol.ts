/**
 * NBD wire format (NetworkBlockDevice/nbd doc/proto.md): constants, encoders and decoders
 * shared by the server and the client. Everything on the wire is big-endian.
 */

// Magics. The 64-bit ones are kept as bigint so they can be compared exactly.
export const NBD_MAGIC = 0x4e42444d41474943n; // "NBDMAGIC"
export const NBD_OPTS_MAGIC = 0x49484156454f5054n; // "IHAVEOPT"
export const NBD_CLISERV_MAGIC = 0x00420281861253n; // oldstyle, never sent by us
export const NBD_REP_MAGIC = 0x0003e889045565a9n;
export const NBD_REQUEST_MAGIC = 0x25609513;
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;

// Handshake flags (server, 16 bits).
export const NBD_FLAG_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_NO_ZEROES = 1 << 1;

// Client flags (32 bits).
export const NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_C_NO_ZEROES = 1 << 1;
export const NBD_FLAG_C_KNOWN = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;

// Transmission flags (16 bits).
export const NBD_FLAG_HAS_FLAGS = 1 << 0;
export const NBD_FLAG_READ_ONLY = 1 << 1;
export const NBD_FLAG_SEND_FLUSH = 1 << 2;
export const NBD_FLAG_SEND_FUA = 1 << 3;
export const NBD_FLAG_ROTATIONAL = 1 << 4;
export const NBD_FLAG_SEND_TRIM = 1 << 5;
export const NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6;
export const NBD_FLAG_SEND_DF = 1 << 7;
export const NBD_FLAG_CAN_MULTI_CONN = 1 << 8;
export const NBD_FLAG_SEND_RESIZE = 1 << 9;
export const NBD_FLAG_SEND_CACHE = 1 << 10;
export const NBD_FLAG_SEND_FAST_ZERO = 1 << 11;

// Options.
export const NBD_OPT_EXPORT_NAME = 1;
export const NBD_OPT_ABORT = 2;
export const NBD_OPT_LIST = 3;
export const NBD_OPT_PEEK_EXPORT = 4;
export const NBD_OPT_STARTTLS = 5;
export const NBD_OPT_INFO = 6;
export const NBD_OPT_GO = 7;
export const NBD_OPT_STRUCTURED_REPLY = 8;
export const NBD_OPT_LIST_META_CONTEXT = 9;
export const NBD_OPT_SET_META_CONTEXT = 10;
export const NBD_OPT_EXTENDED_HEADERS = 11;

// Option replies. Errors have bit 31 set.
export const NBD_REP_ACK = 1;
export const NBD_REP_SERVER = 2;
export const NBD_REP_INFO = 3;
export const NBD_REP_META_CONTEXT = 4;
export const NBD_REP_FLAG_ERROR = 0x80000000;
export const NBD_REP_ERR_UNSUP = 0x80000001;
export const NBD_REP_ERR_POLICY = 0x80000002;
export const NBD_REP_ERR_INVALID = 0x80000003;
export const NBD_REP_ERR_PLATFORM = 0x80000004;
export const NBD_REP_ERR_TLS_REQD = 0x80000005;
export const NBD_REP_ERR_UNKNOWN = 0x80000006;
export const NBD_REP_ERR_SHUTDOWN = 0x80000007;
export const NBD_REP_ERR_BLOCK_SIZE_REQD = 0x80000008;
export const NBD_REP_ERR_TOO_BIG = 0x80000009;

// NBD_REP_INFO types.
export const NBD_INFO_EXPORT = 0;
export const NBD_INFO_NAME = 1;
export const NBD_INFO_DESCRIPTION = 2;
export const NBD_INFO_BLOCK_SIZE = 3;

// Commands.
export const NBD_CMD_READ = 0;
export const NBD_CMD_WRITE = 1;
export const NBD_CMD_DISC = 2;
export const NBD_CMD_FLUSH = 3;
export const NBD_CMD_TRIM = 4;
export const NBD_CMD_CACHE = 5;
export const NBD_CMD_WRITE_ZEROES = 6;
export const NBD_CMD_BLOCK_STATUS = 7;
export const NBD_CMD_RESIZE = 8;

// Command flags.
export const NBD_CMD_FLAG_FUA = 1 << 0;
export const NBD_CMD_FLAG_NO_HOLE = 1 << 1;
export const NBD_CMD_FLAG_DF = 1 << 2;
export const NBD_CMD_FLAG_REQ_ONE = 1 << 3;
export const NBD_CMD_FLAG_FAST_ZERO = 1 << 4;

// Structured reply flags and types.
export const NBD_REPLY_FLAG_DONE = 1 << 0;
export const NBD_REPLY_TYPE_NONE = 0;
export const NBD_REPLY_TYPE_OFFSET_DATA = 1;
export const NBD_REPLY_TYPE_OFFSET_HOLE = 2;
export const NBD_REPLY_TYPE_BLOCK_STATUS = 5;
export const NBD_REPLY_TYPE_ERROR = 0x8001;
export const NBD_REPLY_TYPE_ERROR_OFFSET = 0x8002;
export const NBD_REPLY_TYPE_IS_ERROR = 0x8000;

// Error values: the protocol fixes these numbers independently of the host's errno.
export const NBD_EPERM = 1;
export const NBD_EIO = 5;
export const NBD_ENOMEM = 12;
export const NBD_EINVAL = 22;
export const NBD_ENOSPC = 28;
export const NBD_EOVERFLOW = 75;
export const NBD_ENOTSUP = 95;
export const NBD_ESHUTDOWN = 108;

// Sizes of fixed-length messages.
export const HANDSHAKE_GREETING_SIZE = 18; // NBDMAGIC + IHAVEOPT + u16 flags
export const CLIENT_FLAGS_SIZE = 4;
export const OPTION_HEADER_SIZE = 16; // IHAVEOPT + u32 option + u32 length
export const OPTION_REPLY_HEADER_SIZE = 20; // magic u64 + option u32 + type u32 + length u32
export const EXPORT_NAME_REPLY_SIZE = 10; // u64 size + u16 flags (+124 zeroes unless NO_ZEROES)
export const EXPORT_NAME_ZEROES = 124;
export const REQUEST_HEADER_SIZE = 28;
export const SIMPLE_REPLY_HEADER_SIZE = 16;
export const STRUCTURED_REPLY_HEADER_SIZE = 20;

/** Longest string the protocol allows (export names, messages). */
export const NBD_MAX_STRING = 4096;

const TWO_32 = 0x1_0000_0000;

const errnoNames: Record<number, string> = {
  [NBD_EPERM]: 'EPERM',
  [NBD_EIO]: 'EIO',
  [NBD_ENOMEM]: 'ENOMEM',
  [NBD_EINVAL]: 'EINVAL',
  [NBD_ENOSPC]: 'ENOSPC',
  [NBD_EOVERFLOW]: 'EOVERFLOW',
  [NBD_ENOTSUP]: 'ENOTSUP',
  [NBD_ESHUTDOWN]: 'ESHUTDOWN',
};

export function nbdErrorName(code: number): string {
  return errnoNames[code] ?? `error ${code}`;
}

/**
 * Maps a device failure to a protocol error. Only codes that keep their meaning across the wire
 * are passed on; anything unknown becomes EIO so a client never mistakes it for success.
 */
export function errnoFromError(err: unknown): number {
  const code = typeof err === 'object' && err !== null ? (err as { code?: unknown }).code : undefined;
  switch (code) {
    case 'EPERM':
    case 'EACCES':
    case 'EROFS':
      return NBD_EPERM;
    case 'ENOMEM':
      return NBD_ENOMEM;
    case 'EINVAL':
      return NBD_EINVAL;
    case 'ENOSPC':
    case 'EDQUOT': // proto.md asks for EDQUOT and EFBIG to be reported as ENOSPC
    case 'EFBIG':
      return NBD_ENOSPC;
    case 'ESHUTDOWN':
      return NBD_ESHUTDOWN;
    default:
      return NBD_EIO;
  }
}

export function commandName(type: number): string {
  switch (type) {
    case NBD_CMD_READ: return 'READ';
    case NBD_CMD_WRITE: return 'WRITE';
    case NBD_CMD_DISC: return 'DISC';
    case NBD_CMD_FLUSH: return 'FLUSH';
    case NBD_CMD_TRIM: return 'TRIM';
    case NBD_CMD_CACHE: return 'CACHE';
    case NBD_CMD_WRITE_ZEROES: return 'WRITE_ZEROES';
    case NBD_CMD_BLOCK_STATUS: return 'BLOCK_STATUS';
    default: return `CMD_${type}`;
  }
}

export function optionName(opt: number): string {
  switch (opt) {
    case NBD_OPT_EXPORT_NAME: return 'EXPORT_NAME';
    case NBD_OPT_ABORT: return 'ABORT';
    case NBD_OPT_LIST: return 'LIST';
    case NBD_OPT_STARTTLS: return 'STARTTLS';
    case NBD_OPT_INFO: return 'INFO';
    case NBD_OPT_GO: return 'GO';
    case NBD_OPT_STRUCTURED_REPLY: return 'STRUCTURED_REPLY';
    case NBD_OPT_LIST_META_CONTEXT: return 'LIST_META_CONTEXT';
    case NBD_OPT_SET_META_CONTEXT: return 'SET_META_CONTEXT';
    case NBD_OPT_EXTENDED_HEADERS: return 'EXTENDED_HEADERS';
    default: return `OPT_${opt}`;
  }
}

/** Names an option reply error type (NBD_REP_ERR_*), for messages. */
export function optionErrorName(type: number): string {
  switch (type) {
    case NBD_REP_ERR_UNSUP: return 'NBD_REP_ERR_UNSUP (not supported)';
    case NBD_REP_ERR_POLICY: return 'NBD_REP_ERR_POLICY (forbidden by policy)';
    case NBD_REP_ERR_INVALID: return 'NBD_REP_ERR_INVALID';
    case NBD_REP_ERR_PLATFORM: return 'NBD_REP_ERR_PLATFORM';
    case NBD_REP_ERR_TLS_REQD: return 'NBD_REP_ERR_TLS_REQD (the server requires TLS: use nbds://)';
    case NBD_REP_ERR_UNKNOWN: return 'NBD_REP_ERR_UNKNOWN (no such export)';
    case NBD_REP_ERR_SHUTDOWN: return 'NBD_REP_ERR_SHUTDOWN';
    case NBD_REP_ERR_BLOCK_SIZE_REQD: return 'NBD_REP_ERR_BLOCK_SIZE_REQD';
    case NBD_REP_ERR_TOO_BIG: return 'NBD_REP_ERR_TOO_BIG';
    default: return `reply 0x${type.toString(16)}`;
  }
}

/**
 * u64 as a JS number. Values above 2^53 lose precision, which is harmless here: every such
 * offset is far beyond any export and fails the range check anyway.
 */
export function readU64(buf: Buffer, at: number): number {
  return buf.readUInt32BE(at) * TWO_32 + buf.readUInt32BE(at + 4);
}

export function writeU64(buf: Buffer, value: number, at: number): void {
  if (!Number.isSafeInteger(value) || value < 0) throw new RangeError(`not a u64: ${value}`);
  buf.writeUInt32BE(Math.floor(value / TWO_32), at);
  buf.writeUInt32BE(value % TWO_32, at + 4);
}

// ---------------------------------------------------------------------------------------------
// Incremental reader

/**
 * Bytes received but not yet consumed, kept as the list of chunks the socket delivered. A read
 * that falls inside one chunk is returned as a view of it; only reads that straddle chunks are
 * copied, and only the straddling bytes.
 */
export class ByteQueue {
  private chunks: (Buffer | undefined)[] = [];
  private head = 0; // index of the first live chunk
  private offset = 0; // bytes already consumed from chunks[head]
  private total = 0;

  get length(): number {
    return this.total;
  }

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.total += chunk.length;
  }

  /** Removes and returns n bytes; the caller must have checked `length`. */
  take(n: number): Buffer {
    if (n > this.total) throw new RangeError(`take(${n}) with only ${this.total} buffered`);
    if (n === 0) return Buffer.alloc(0);
    const first = this.chunks[this.head]!;
    const avail = first.length - this.offset;
    if (n <= avail) {
      const out = first.subarray(this.offset, this.offset + n);
      this.advance(n);
      return out;
    }
    const out = Buffer.allocUnsafe(n);
    let filled = 0;
    while (filled < n) {
      const chunk = this.chunks[this.head]!;
      const want = Math.min(n - filled, chunk.length - this.offset);
      chunk.copy(out, filled, this.offset, this.offset + want);
      filled += want;
      this.advance(want);
    }
    return out;
  }

  /** Moves n bytes into dst at dstOffset (one copy, no intermediate buffer). */
  takeInto(dst: Buffer, dstOffset: number, n: number): void {
    if (n > this.total) throw new RangeError(`takeInto(${n}) with only ${this.total} buffered`);
    while (n > 0) {
      const chunk = this.chunks[this.head]!;
      const step = Math.min(n, chunk.length - this.offset);
      chunk.copy(dst, dstOffset, this.offset, this.offset + step);
      dstOffset += step;
      n -= step;
      this.advance(step);
    }
  }

  /** Discards up to n bytes without copying; returns how many were discarded. */
  skip(n: number): number {
    const todo = Math.min(n, this.total);
    let left = todo;
    while (left > 0) {
      const chunk = this.chunks[this.head]!;
      const step = Math.min(left, chunk.length - this.offset);
      this.advance(step);
      left -= step;
    }
    return todo;
  }

  /** Reads a u32 at `at` bytes ahead without consuming anything. */
  peekUInt32BE(at: number): number {
    let value = 0;
    for (let i = 0; i < 4; i++) value = value * 256 + this.peekByte(at + i);
    return value;
  }

  clear(): void {
    this.chunks = [];
    this.head = 0;
    this.offset = 0;
    this.total = 0;
  }

  private peekByte(at: number): number {
    if (at >= this.total) throw new RangeError('peek past the buffered data');
    let pos = at + this.offset;
    for (let i = this.head; ; i++) {
      const chunk = this.chunks[i]!;
      if (pos < chunk.length) return chunk[pos]!;
      pos -= chunk.length;
    }
  }

  private advance(n: number): void {
    this.total -= n;
    this.offset += n;
    const chunk = this.chunks[this.head]!;
    if (this.offset === chunk.length) {
      this.chunks[this.head] = undefined; // let the chunk be collected
      this.head++;
      this.offset = 0;
      // Compact now and then so the array does not grow without bound.
      if (this.head > 64 && this.head * 2 > this.chunks.length) {
        this.chunks = this.chunks.slice(this.head);
        this.head = 0;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Handshake

export function encodeGreeting(handshakeFlags: number): Buffer {
  const b = Buffer.allocUnsafe(HANDSHAKE_GREETING_SIZE);
  b.writeBigUInt64BE(NBD_MAGIC, 0);
  b.writeBigUInt64BE(NBD_OPTS_MAGIC, 8);
  b.writeUInt16BE(handshakeFlags, 16);
  return b;
}

export interface Greeting {
  handshakeFlags: number;
}

/** Throws on a server that is not newstyle (oldstyle servers are not supported). */
export function decodeGreeting(b: Buffer): Greeting {
  if (b.readBigUInt64BE(0) !== NBD_MAGIC) throw new ProtocolError('bad NBDMAGIC in greeting');
  const second = b.readBigUInt64BE(8);
  if (second === NBD_CLISERV_MAGIC) throw new ProtocolError('oldstyle NBD servers are not supported');
  if (second !== NBD_OPTS_MAGIC) throw new ProtocolError('bad IHAVEOPT in greeting');
  return { handshakeFlags: b.readUInt16BE(16) };
}

export function encodeClientFlags(flags: number): Buffer {
  const b = Buffer.allocUnsafe(CLIENT_FLAGS_SIZE);
  b.writeUInt32BE(flags >>> 0, 0);
  return b;
}

export interface OptionHeader {
  option: number;
  length: number;
}

export function encodeOption(option: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.allocUnsafe(OPTION_HEADER_SIZE + data.length);
  b.writeBigUInt64BE(NBD_OPTS_MAGIC, 0);
  b.writeUInt32BE(option >>> 0, 8);
  b.writeUInt32BE(data.length, 12);
  data.copy(b, OPTION_HEADER_SIZE);
  return b;
}

export function decodeOptionHeader(b: Buffer): OptionHeader {
  if (b.readBigUInt64BE(0) !== NBD_OPTS_MAGIC) throw new ProtocolError('bad IHAVEOPT in option request');
  return { option: b.readUInt32BE(8), length: b.readUInt32BE(12) };
}

export interface OptionReplyHeader {
  option: number;
  type: number;
  length: number;
}

export function encodeOptionReply(option: number, type: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.allocUnsafe(OPTION_REPLY_HEADER_SIZE + data.length);
  b.writeBigUInt64BE(NBD_REP_MAGIC, 0);
  b.writeUInt32BE(option >>> 0, 8);
  b.writeUInt32BE(type >>> 0, 12);
  b.writeUInt32BE(data.length, 16);
  data.copy(b, OPTION_REPLY_HEADER_SIZE);
  return b;
}

export function decodeOptionReplyHeader(b: Buffer): OptionReplyHeader {
  if (b.readBigUInt64BE(0) !== NBD_REP_MAGIC) throw new ProtocolError('bad option reply magic');
  return { option: b.readUInt32BE(8), type: b.readUInt32BE(12), length: b.readUInt32BE(16) };
}

/** Reply to NBD_OPT_EXPORT_NAME: size, transmission flags and (without NO_ZEROES) padding. */
export function encodeExportNameReply(size: number, transmissionFlags: number, noZeroes: boolean): Buffer {
  const b = Buffer.alloc(EXPORT_NAME_REPLY_SIZE + (noZeroes ? 0 : EXPORT_NAME_ZEROES));
  writeU64(b, size, 0);
  b.writeUInt16BE(transmissionFlags, 8);
  return b;
}

export function decodeExportNameReply(b: Buffer): { size: number; transmissionFlags: number } {
  return { size: readU64(b, 0), transmissionFlags: b.readUInt16BE(8) };
}

/** Payload of NBD_REP_SERVER: the name, then an optional human-readable description. */
export function encodeRepServer(name: string, description = ''): Buffer {
  const n = Buffer.from(name, 'utf8');
  const d = Buffer.from(description, 'utf8');
  const b = Buffer.allocUnsafe(4 + n.length + d.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  d.copy(b, 4 + n.length);
  return b;
}

export function decodeRepServer(b: Buffer): { name: string; description: string } {
  if (b.length < 4) throw new ProtocolError('NBD_REP_SERVER too short');
  const len = b.readUInt32BE(0);
  if (len > b.length - 4) throw new ProtocolError('NBD_REP_SERVER name overruns the reply');
  return {
    name: b.toString('utf8', 4, 4 + len),
    description: b.toString('utf8', 4 + len),
  };
}

/** Data of NBD_OPT_INFO / NBD_OPT_GO. */
export interface InfoRequest {
  name: string;
  requests: number[];
}

export function encodeInfoRequest(name: string, requests: number[]): Buffer {
  const n = Buffer.from(name, 'utf8');
  const b = Buffer.allocUnsafe(4 + n.length + 2 + 2 * requests.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  let at = 4 + n.length;
  b.writeUInt16BE(requests.length, at);
  at += 2;
  for (const r of requests) {
    b.writeUInt16BE(r, at);
    at += 2;
  }
  return b;
}

/** Returns null when the lengths inside do not add up, which the server answers with ERR_INVALID. */
export function decodeInfoRequest(b: Buffer): InfoRequest | null {
  if (b.length < 6) return null;
  const nameLen = b.readUInt32BE(0);
  if (nameLen > b.length - 6) return null;
  const count = b.readUInt16BE(4 + nameLen);
  if (b.length !== 6 + nameLen + 2 * count) return null;
  const requests: number[] = [];
  for (let i = 0; i < count; i++) requests.push(b.readUInt16BE(6 + nameLen + 2 * i));
  return { name: b.toString('utf8', 4, 4 + nameLen), requests };
}

export function encodeInfoExport(size: number, transmissionFlags: number): Buffer {
  const b = Buffer.allocUnsafe(12);
  b.writeUInt16BE(NBD_INFO_EXPORT, 0);
  writeU64(b, size, 2);
  b.writeUInt16BE(transmissionFlags, 10);
  return b;
}

export function encodeInfoString(type: typeof NBD_INFO_NAME | typeof NBD_INFO_DESCRIPTION, text: string): Buffer {
  const s = Buffer.from(text, 'utf8');
  const b = Buffer.allocUnsafe(2 + s.length);
  b.writeUInt16BE(type, 0);
  s.copy(b, 2);
  return b;
}

export function encodeInfoBlockSize(min: number, preferred: number, max: number): Buffer {
  const b = Buffer.allocUnsafe(14);
  b.writeUInt16BE(NBD_INFO_BLOCK_SIZE, 0);
  b.writeUInt32BE(min, 2);
  b.writeUInt32BE(preferred, 6);
  b.writeUInt32BE(max, 10);
  return b;
}

export type InfoReply =
  | { type: typeof NBD_INFO_EXPORT; size: number; transmissionFlags: number }
  | { type: typeof NBD_INFO_NAME; name: string }
  | { type: typeof NBD_INFO_DESCRIPTION; description: string }
  | { type: typeof NBD_INFO_BLOCK_SIZE; minimum: number; preferred: number; maximum: number }
  | { type: number; unknown: true };

export function decodeInfoReply(b: Buffer): InfoReply {
  if (b.length < 2) throw new ProtocolError('NBD_REP_INFO too short');
  const type = b.readUInt16BE(0);
  switch (type) {
    case NBD_INFO_EXPORT:
      if (b.length !== 12) throw new ProtocolError('NBD_INFO_EXPORT must be 12 bytes');
      return { type, size: readU64(b, 2), transmissionFlags: b.readUInt16BE(10) };
    case NBD_INFO_NAME:
      return { type, name: b.toString('utf8', 2) };
    case NBD_INFO_DESCRIPTION:
      return { type, description: b.toString('utf8', 2) };
    case NBD_INFO_BLOCK_SIZE:
      if (b.length !== 14) throw new ProtocolError('NBD_INFO_BLOCK_SIZE must be 14 bytes');
      return { type, minimum: b.readUInt32BE(2), preferred: b.readUInt32BE(6), maximum: b.readUInt32BE(10) };
    default:
      return { type, unknown: true };
  }
}

// ---------------------------------------------------------------------------------------------
// Transmission

export interface RequestHeader {
  flags: number;
  type: number;
  handle: bigint;
  offset: number;
  length: number;
}

export function encodeRequestHeader(req: RequestHeader, into?: Buffer, at = 0): Buffer {
  const b = into ?? Buffer.allocUnsafe(REQUEST_HEADER_SIZE);
  b.writeUInt32BE(NBD_REQUEST_MAGIC, at);
  b.writeUInt16BE(req.flags, at + 4);
  b.writeUInt16BE(req.type, at + 6);
  b.writeBigUInt64BE(req.handle, at + 8);
  writeU64(b, req.offset, at + 16);
  b.writeUInt32BE(req.length, at + 24);
  return b;
}

/** Decodes a request header; the caller checks the magic first (see requestMagicOk). */
export function decodeRequestHeader(b: Buffer, at = 0): RequestHeader {
  return {
    flags: b.readUInt16BE(at + 4),
    type: b.readUInt16BE(at + 6),
    handle: b.readBigUInt64BE(at + 8),
    offset: readU64(b, at + 16),
    length: b.readUInt32BE(at + 24),
  };
}

export function requestMagicOk(b: Buffer, at = 0): boolean {
  return b.readUInt32BE(at) === NBD_REQUEST_MAGIC;
}

export function encodeSimpleReply(handle: bigint, error: number): Buffer {
  const b = Buffer.allocUnsafe(SIMPLE_REPLY_HEADER_SIZE);
  b.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(error >>> 0, 4);
  b.writeBigUInt64BE(handle, 8);
  return b;
}

function structuredHeader(extra: number, flags: number, type: number, handle: bigint, length: number): Buffer {
  const b = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_SIZE + extra);
  b.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeBigUInt64BE(handle, 8);
  b.writeUInt32BE(length, 16);
  return b;
}

/**
 * Header of an OFFSET_DATA chunk including its 8-byte offset field; the data itself is written
 * after it separately so it is never copied into a combined buffer.
 */
export function encodeOffsetDataHeader(handle: bigint, flags: number, offset: number, dataLength: number): Buffer {
  const b = structuredHeader(8, flags, NBD_REPLY_TYPE_OFFSET_DATA, handle, 8 + dataLength);
  writeU64(b, offset, STRUCTURED_REPLY_HEADER_SIZE);
  return b;
}

export function encodeNoneChunk(handle: bigint): Buffer {
  return structuredHeader(0, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, handle, 0);
}

export function encodeErrorChunk(handle: bigint, flags: number, error: number, message = ''): Buffer {
  let msg = Buffer.from(message, 'utf8');
  if (msg.length > NBD_MAX_STRING) msg = msg.subarray(0, NBD_MAX_STRING);
  const b = structuredHeader(6 + msg.length, flags, NBD_REPLY_TYPE_ERROR, handle, 6 + msg.length);
  b.writeUInt32BE(error >>> 0, STRUCTURED_REPLY_HEADER_SIZE);
  b.writeUInt16BE(msg.length, STRUCTURED_REPLY_HEADER_SIZE + 4);
  msg.copy(b, STRUCTURED_REPLY_HEADER_SIZE + 6);
  return b;
}

export interface SimpleReplyHeader {
  error: number;
  handle: bigint;
}

export interface StructuredChunkHeader {
  flags: number;
  type: number;
  handle: bigint;
  length: number;
}

/** Decoded payload of an error chunk (ERROR or ERROR_OFFSET or any unknown type with bit 15). */
export interface ErrorChunk {
  error: number;
  message: string;
  offset?: number;
}

export function decodeErrorChunkPayload(type: number, p: Buffer): ErrorChunk {
  if (p.length < 6) throw new ProtocolError('error chunk shorter than 6 bytes');
  const error = p.readUInt32BE(0);
  const msgLen = p.readUInt16BE(4);
  if (msgLen > p.length - 6) throw new ProtocolError('error chunk message overruns the chunk');
  const out: ErrorChunk = { error, message: p.toString('utf8', 6, 6 + msgLen) };
  if (type === NBD_REPLY_TYPE_ERROR_OFFSET) {
    if (p.length < 6 + msgLen + 8) throw new ProtocolError('ERROR_OFFSET chunk lacks its offset');
    out.offset = readU64(p, 6 + msgLen);
  }
  return out;
}

/** A violation of the protocol by the peer: the connection cannot continue. */
export class ProtocolError extends Error {
  override name = 'ProtocolError';
}

/** An error reply from the peer for one request; the connection goes on. */
export class NbdRequestError extends Error {
  override name = 'NbdRequestError';
  readonly errno: number;
  readonly code: string;
  constructor(errno: number, message?: string) {
    super(message && message.length > 0 ? `${nbdErrorName(errno)}: ${message}` : nbdErrorName(errno));
    this.errno = errno;
    this.code = nbdErrorName(errno);
  }
}
