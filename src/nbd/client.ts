/**
 * NBD client: fixed newstyle handshake (NBD_OPT_GO, falling back to NBD_OPT_EXPORT_NAME),
 * optional structured replies, and pipelined requests with many in flight. It implements
 * BlockDevice, so a remote export can stand wherever a local device does.
 */
import net from 'node:net';
import tls from 'node:tls';
import type { BlockDevice } from '../cache/block-device.js';
import {
  ByteQueue,
  NBD_CMD_DISC,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_ESHUTDOWN,
  NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_NO_ZEROES,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_DF,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_EXPORT,
  NBD_OPT_ABORT,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO,
  NBD_OPT_LIST,
  NBD_OPT_STARTTLS,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_IS_ERROR,
  NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
  NBD_REP_ACK,
  NBD_REP_ERR_UNSUP,
  NBD_REP_FLAG_ERROR,
  NBD_REP_INFO,
  NBD_REP_SERVER,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
  NbdRequestError,
  OPTION_REPLY_HEADER_SIZE,
  ProtocolError,
  STRUCTURED_REPLY_HEADER_SIZE,
  SIMPLE_REPLY_HEADER_SIZE,
  EXPORT_NAME_REPLY_SIZE,
  EXPORT_NAME_ZEROES,
  HANDSHAKE_GREETING_SIZE,
  commandName,
  decodeErrorChunkPayload,
  decodeExportNameReply,
  decodeGreeting,
  decodeInfoReply,
  decodeOptionReplyHeader,
  decodeRepServer,
  encodeClientFlags,
  encodeInfoRequest,
  encodeOption,
  encodeRequestHeader,
  optionErrorName,
  readU64,
} from './protocol.js';
import { clientTlsOptions, type ClientTlsSettings } from './tls.js';

export type NbdTarget = (
  | { transport: 'tcp'; host: string; port: number; exportName: string }
  | { transport: 'unix'; path: string; exportName: string }
) & {
  /** Present for nbds:// and nbds+unix://: STARTTLS is required before anything else. */
  tls?: ClientTlsSettings;
};

export const NBD_DEFAULT_PORT = 10809;

const TLS_QUERY = ['tls-psk-file', 'tls-username', 'tls-certificates', 'tls-verify-peer'] as const;

/** libnbd's query parameters for TLS; a username may also come as the URI's user part. */
function tlsFromUri(u: URL, uri: string, secure: boolean, user: string): ClientTlsSettings | undefined {
  const given = TLS_QUERY.filter((k) => u.searchParams.has(k));
  if (!secure) {
    if (given.length > 0) throw new Error(`${given.join(', ')} given in a URI without TLS; use nbds:// or nbds+unix://: ${uri}`);
    return undefined;
  }
  const q = (k: (typeof TLS_QUERY)[number]): string | undefined => u.searchParams.get(k) ?? undefined;
  const out: ClientTlsSettings = {};
  const pskFile = q('tls-psk-file');
  const username = q('tls-username') ?? (user ? decodeURIComponent(user) : undefined);
  const certificatesDir = q('tls-certificates');
  const verify = q('tls-verify-peer');
  if (pskFile !== undefined) out.pskFile = pskFile;
  if (username !== undefined) out.username = username;
  if (certificatesDir !== undefined) out.certificatesDir = certificatesDir;
  if (verify !== undefined) {
    if (!/^(true|false|1|0|yes|no|on|off)$/i.test(verify)) throw new Error(`tls-verify-peer must be a boolean: ${uri}`);
    out.verifyPeer = /^(true|1|yes|on)$/i.test(verify);
  }
  if (pskFile !== undefined && certificatesDir !== undefined) throw new Error(`tls-psk-file and tls-certificates exclude each other: ${uri}`);
  return out;
}

/**
 * Parses `nbd[s]://host[:port]/[export]` and `nbd[s]+unix:///[export]?socket=/path`, with
 * libnbd's TLS query parameters (tls-psk-file, tls-username, tls-certificates, tls-verify-peer).
 */
export function parseNbdUri(uri: string): NbdTarget {
  // libnbd takes nbds+unix://USER@/?socket=... (a user with no host), which URL refuses.
  const unixUser = /^(nbds?\+unix:\/\/)([^@/]+)@\//i.exec(uri);
  let u: URL;
  try {
    u = new URL(unixUser ? `${unixUser[1]}/${uri.slice(unixUser[0].length)}` : uri);
  } catch {
    throw new Error(`invalid NBD URI: ${uri}`);
  }

  const exportName = decodeURIComponent(u.pathname.replace(/^\//, ''));
  const secure = u.protocol === 'nbds:' || u.protocol === 'nbds+tcp:' || u.protocol === 'nbds+unix:';
  let target: NbdTarget;
  switch (u.protocol) {
    case 'nbd:':
    case 'nbd+tcp:':
    case 'nbds:':
    case 'nbds+tcp:': {
      if (!u.hostname) throw new Error(`NBD URI without a host: ${uri}`);
      const host = u.hostname.replace(/^\[(.*)\]$/, '$1'); // bare IPv6 for net.connect
      target = { transport: 'tcp', host, port: u.port ? Number(u.port) : NBD_DEFAULT_PORT, exportName };
      break;
    }
    case 'nbd+unix:':
    case 'nbds+unix:': {
      const path = u.searchParams.get('socket');
      if (!path) throw new Error(`${u.protocol.slice(0, -1)} URI needs ?socket=: ${uri}`);
      if (u.hostname) throw new Error(`${u.protocol.slice(0, -1)} URI must not name a host: ${uri}`);
      target = { transport: 'unix', path, exportName };
      break;
    }
    default:
      throw new Error(`not an NBD URI: ${uri}`);
  }
  const tlsSettings = tlsFromUri(u, uri, secure, unixUser ? unixUser[2]! : u.username);
  if (tlsSettings) target.tls = tlsSettings;
  return target;
}

export interface NbdClientOptions {
  /** Overrides the export name in the target. */
  exportName?: string;
  /** Ask for structured replies (default true). */
  structuredReplies?: boolean;
  /** Requests allowed in flight at once; more wait their turn (default 64). */
  maxInFlight?: number;
  /** Gives up on connecting and negotiating after this long (default 30 s). */
  connectTimeoutMs?: number;
}

export interface NbdBlockSize {
  minimum: number;
  preferred: number;
  maximum: number;
}

export interface NbdExportEntry {
  name: string;
  description: string;
}

/** Largest single request when the server advertises no limit (proto.md's portable maximum). */
const DEFAULT_MAX_REQUEST = 32 * 1024 * 1024;
/** TRIM and WRITE_ZEROES carry no payload; they are split only to fit the 32-bit length. */
const MAX_NO_PAYLOAD_REQUEST = 0x8000_0000;

interface Pending {
  type: number;
  handle: bigint;
  offset: number;
  length: number;
  resolve: (data: Buffer | undefined) => void;
  reject: (err: Error) => void;
  /** READ: where the data goes (the caller's buffer, or one made here) and how many bytes chunks covered. */
  data?: Buffer;
  /** READ into the caller's buffer: the reply is copied straight into `data`, never handed over as a view. */
  into: boolean;
  covered: number;
  error?: NbdRequestError;
}

/**
 * Reads exactly n bytes during the handshake, before the transmission reader takes over.
 */
class HandshakeReader {
  private waiter: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | null = null;
  private failure: Error | null = null;
  constructor(readonly queue: ByteQueue) {}

  read(n: number): Promise<Buffer> {
    if (this.queue.length >= n) return Promise.resolve(this.queue.take(n));
    if (this.failure) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => (this.waiter = { n, resolve, reject }));
  }

  wake(): void {
    const w = this.waiter;
    if (w && this.queue.length >= w.n) {
      this.waiter = null;
      w.resolve(this.queue.take(w.n));
    }
  }

  fail(err: Error): void {
    this.failure ??= err;
    const w = this.waiter;
    this.waiter = null;
    w?.reject(err);
  }
}

function connectSocket(target: NbdTarget): net.Socket {
  return target.transport === 'tcp'
    ? net.connect({ host: target.host, port: target.port, noDelay: true })
    : net.connect({ path: target.path });
}

/** Lists the exports of a server (NBD_OPT_LIST), then aborts the session politely. */
export async function listNbdExports(target: string | NbdTarget, timeoutMs = 30_000): Promise<NbdExportEntry[]> {
  const t = typeof target === 'string' ? parseNbdUri(target) : target;
  const h = await openHandshake(t, timeoutMs);
  const { reader, cleanup } = h;
  try {
    const flags = await greet(h, t);
    const socket = h.socket;
    if (!(flags & NBD_FLAG_FIXED_NEWSTYLE)) throw new Error('server does not support NBD_OPT_LIST');
    socket.write(encodeOption(NBD_OPT_LIST));
    const out: NbdExportEntry[] = [];
    for (;;) {
      const rep = await readOptionReply(reader, NBD_OPT_LIST);
      if (rep.type === NBD_REP_SERVER) out.push(decodeRepServer(rep.data));
      else if (rep.type === NBD_REP_ACK) break;
      else throw optionError('NBD_OPT_LIST', rep.type, rep.data);
    }
    socket.write(encodeOption(NBD_OPT_ABORT));
    socket.end();
    return out;
  } catch (err) {
    h.socket.destroy();
    throw err;
  } finally {
    cleanup();
  }
}

export async function connectNbd(target: string | NbdTarget, opts: NbdClientOptions = {}): Promise<NbdClient> {
  const t = typeof target === 'string' ? parseNbdUri(target) : target;
  const exportName = opts.exportName ?? t.exportName;
  const h = await openHandshake(t, opts.connectTimeoutMs ?? 30_000);
  const { reader, queue, cleanup } = h;
  try {
    const serverFlags = await greet(h, t);
    const socket = h.socket;
    const fixed = (serverFlags & NBD_FLAG_FIXED_NEWSTYLE) !== 0;
    const noZeroes = (serverFlags & NBD_FLAG_NO_ZEROES) !== 0;
    let structured = false;
    if (fixed && opts.structuredReplies !== false) {
      socket.write(encodeOption(NBD_OPT_STRUCTURED_REPLY));
      const rep = await readOptionReply(reader, NBD_OPT_STRUCTURED_REPLY);
      structured = rep.type === NBD_REP_ACK;
    }
    let size = -1;
    let tflags = 0;
    let blockSize: NbdBlockSize | null = null;
    let description: string | undefined;
    let usedGo = false;
    if (fixed) {
      socket.write(encodeOption(NBD_OPT_GO, encodeInfoRequest(exportName, [NBD_INFO_DESCRIPTION, NBD_INFO_BLOCK_SIZE])));
      for (;;) {
        const rep = await readOptionReply(reader, NBD_OPT_GO);
        if (rep.type === NBD_REP_INFO) {
          const info = decodeInfoReply(rep.data);
          if (info.type === NBD_INFO_EXPORT && 'size' in info) {
            size = info.size;
            tflags = info.transmissionFlags;
          } else if (info.type === NBD_INFO_BLOCK_SIZE && 'minimum' in info) {
            blockSize = { minimum: info.minimum, preferred: info.preferred, maximum: info.maximum };
          } else if (info.type === NBD_INFO_DESCRIPTION && 'description' in info) {
            description = info.description;
          }
        } else if (rep.type === NBD_REP_ACK) {
          if (size < 0) throw new ProtocolError('NBD_OPT_GO succeeded without NBD_INFO_EXPORT');
          usedGo = true;
          break;
        } else if (rep.type === NBD_REP_ERR_UNSUP) {
          break; // an old server: fall back to EXPORT_NAME below
        } else if (rep.type & NBD_REP_FLAG_ERROR) {
          throw optionError(`NBD_OPT_GO for export '${exportName}'`, rep.type, rep.data);
        }
        // other reply types are ignored, as proto.md asks of clients
      }
    }
    if (!usedGo) {
      socket.write(encodeOption(NBD_OPT_EXPORT_NAME, Buffer.from(exportName, 'utf8')));
      // A server that rejects the name can only hang up, which read() reports.
      const rep = decodeExportNameReply(await reader.read(EXPORT_NAME_REPLY_SIZE));
      if (!noZeroes) await reader.read(EXPORT_NAME_ZEROES);
      size = rep.size;
      tflags = rep.transmissionFlags;
    }
    cleanup();
    return new NbdClient(socket, queue, {
      exportName,
      size,
      transmissionFlags: tflags,
      structured,
      blockSize,
      description,
      maxInFlight: opts.maxInFlight ?? 64,
    });
  } catch (err) {
    cleanup();
    h.socket.destroy();
    throw err;
  }
}

/** A connection during option haggling; after STARTTLS `socket` is the TLS socket. */
interface Handshake {
  socket: net.Socket;
  reader: HandshakeReader;
  queue: ByteQueue;
  /** Moves the handshake reader onto another socket (the TLS one wrapping the first). */
  moveTo(socket: net.Socket): void;
  cleanup(): void;
}

async function openHandshake(t: NbdTarget, timeoutMs: number): Promise<Handshake> {
  const queue = new ByteQueue();
  const reader = new HandshakeReader(queue);
  const onData = (d: Buffer): void => {
    queue.push(d);
    reader.wake();
  };
  const onError = (err: Error): void => reader.fail(err);
  const onClose = (): void => reader.fail(new Error('server closed the connection during the handshake'));
  const watch = (s: net.Socket): void => {
    s.on('data', onData);
    s.on('error', onError);
    s.on('close', onClose);
  };
  const unwatch = (s: net.Socket): void => {
    s.off('data', onData);
    s.off('error', onError);
    s.off('close', onClose);
  };
  const h: Handshake = {
    socket: connectSocket(t),
    reader,
    queue,
    moveTo(next) {
      unwatch(h.socket);
      h.socket = next;
      watch(next);
    },
    cleanup() {
      clearTimeout(timer);
      unwatch(h.socket);
    },
  };
  watch(h.socket);
  const timer = setTimeout(() => {
    reader.fail(new Error(`NBD handshake timed out after ${timeoutMs} ms`));
    h.socket.destroy();
  }, timeoutMs);
  try {
    await eventOrError(h.socket, 'connect');
  } catch (err) {
    h.cleanup();
    throw err;
  }
  return h;
}

/** Resolves on the socket's `event`, rejects on an error that comes first. */
function eventOrError(socket: net.Socket, event: string): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    const ok = (): void => {
      socket.off('error', bad);
      resolve();
    };
    const bad = (err: Error): void => {
      socket.off(event, ok);
      reject(err);
    };
    socket.once(event, ok);
    socket.once('error', bad);
  });
}

/** Greets the server and, for an nbds:// target, upgrades to TLS before anything else. */
async function greet(h: Handshake, t: NbdTarget): Promise<number> {
  const { handshakeFlags } = decodeGreeting(await h.reader.read(HANDSHAKE_GREETING_SIZE));
  let clientFlags = 0;
  if (handshakeFlags & NBD_FLAG_FIXED_NEWSTYLE) clientFlags |= NBD_FLAG_C_FIXED_NEWSTYLE;
  if (handshakeFlags & NBD_FLAG_NO_ZEROES) clientFlags |= NBD_FLAG_C_NO_ZEROES;
  h.socket.write(encodeClientFlags(clientFlags));
  if (t.tls) {
    if (!(handshakeFlags & NBD_FLAG_FIXED_NEWSTYLE)) throw new Error('TLS was asked for but the server does not speak fixed newstyle');
    await startTls(h, t);
  }
  return handshakeFlags;
}

async function startTls(h: Handshake, t: NbdTarget): Promise<void> {
  // Built before asking, so a bad key file fails without a half-done STARTTLS.
  const opts = clientTlsOptions(t.tls!, t.transport === 'tcp' ? t.host : undefined);
  h.socket.write(encodeOption(NBD_OPT_STARTTLS));
  const rep = await readOptionReply(h.reader, NBD_OPT_STARTTLS);
  if (rep.type !== NBD_REP_ACK) throw optionError('NBD_OPT_STARTTLS (the server may not offer TLS)', rep.type, rep.data);
  if (h.queue.length > 0) throw new ProtocolError('server sent data after acknowledging STARTTLS');
  const raw = h.socket;
  const secure = tls.connect({ ...opts, socket: raw });
  h.moveTo(secure);
  raw.on('error', () => {}); // reported through the TLS socket
  try {
    await eventOrError(secure, 'secureConnect');
  } catch (err) {
    throw new Error(`TLS handshake with the NBD server failed: ${(err as Error).message}`);
  }
}

async function readOptionReply(reader: HandshakeReader, option: number): Promise<{ type: number; data: Buffer }> {
  const h = decodeOptionReplyHeader(await reader.read(OPTION_REPLY_HEADER_SIZE));
  if (h.option !== option) throw new ProtocolError(`reply for option ${h.option} while waiting for ${option}`);
  if (h.length > 16 * 1024 * 1024) throw new ProtocolError(`option reply of ${h.length} bytes`);
  return { type: h.type, data: await reader.read(h.length) };
}

function optionError(what: string, type: number, data: Buffer): Error {
  const msg = data.length ? `: ${data.toString('utf8')}` : '';
  return Object.assign(new Error(`${what} failed: ${optionErrorName(type)}${msg}`), { nbdReply: type });
}

interface ClientInit {
  exportName: string;
  size: number;
  transmissionFlags: number;
  structured: boolean;
  blockSize: NbdBlockSize | null;
  description: string | undefined;
  maxInFlight: number;
}

type ReaderState =
  | { kind: 'magic' }
  /** Bulk data being copied into its destination as it arrives. */
  | { kind: 'fill'; target: Buffer; filled: number; done: () => void }
  | { kind: 'data-offset'; flags: number; handle: bigint; length: number }
  | { kind: 'chunk-payload'; flags: number; type: number; handle: bigint; length: number };

export class NbdClient implements BlockDevice {
  readonly exportName: string;
  readonly transmissionFlags: number;
  readonly structuredReplies: boolean;
  readonly blockSize: NbdBlockSize | null;
  readonly description: string | undefined;
  private readonly exportSize: number;
  private readonly maxRequest: number;
  private readonly maxInFlight: number;
  private readonly pending = new Map<bigint, Pending>();
  /** Callers of request() waiting for a free in-flight slot. */
  private readonly waiting: (() => void)[] = [];
  private readonly idleWaiters: (() => void)[] = [];
  private nextHandle = 1n;
  private state: ReaderState = { kind: 'magic' };
  private failure: Error | null = null;
  private disconnecting = false;
  private corked = false;
  readonly closed: Promise<void>;

  constructor(
    private readonly socket: net.Socket,
    private readonly queue: ByteQueue,
    init: ClientInit,
  ) {
    this.exportName = init.exportName;
    this.exportSize = init.size;
    this.transmissionFlags = init.transmissionFlags;
    this.structuredReplies = init.structured;
    this.blockSize = init.blockSize;
    this.description = init.description;
    this.maxInFlight = Math.max(1, init.maxInFlight);
    const max = init.blockSize?.maximum;
    this.maxRequest = max && max !== 0xffffffff ? Math.min(max, DEFAULT_MAX_REQUEST * 8) : DEFAULT_MAX_REQUEST;
    this.closed = new Promise((resolve) => socket.once('close', () => resolve()));
    socket.on('data', (d: Buffer) => this.onSocketData(d));
    socket.on('error', (err) => this.fail(err));
    socket.on('close', () => this.fail(new Error('NBD connection closed')));
    socket.on('end', () => this.fail(new Error('NBD server closed the connection')));
    // Replies that arrived together with the end of the handshake.
    if (queue.length > 0) this.parse();
  }

  size(): number {
    return this.exportSize;
  }

  get readOnly(): boolean {
    return (this.transmissionFlags & NBD_FLAG_READ_ONLY) !== 0;
  }
  get canFlush(): boolean {
    return (this.transmissionFlags & NBD_FLAG_SEND_FLUSH) !== 0;
  }
  get canFua(): boolean {
    return (this.transmissionFlags & NBD_FLAG_SEND_FUA) !== 0;
  }
  get canTrim(): boolean {
    return (this.transmissionFlags & NBD_FLAG_SEND_TRIM) !== 0;
  }
  get canWriteZeroes(): boolean {
    return (this.transmissionFlags & NBD_FLAG_SEND_WRITE_ZEROES) !== 0;
  }
  get canMultiConn(): boolean {
    return (this.transmissionFlags & NBD_FLAG_CAN_MULTI_CONN) !== 0;
  }
  get canDf(): boolean {
    return (this.transmissionFlags & NBD_FLAG_SEND_DF) !== 0;
  }
  get inFlight(): number {
    return this.pending.size;
  }

  /**
   * Reads; requests larger than the server's maximum block size are split. With `into` (of
   * `length` bytes) the data is copied from the socket straight into it and `into` is returned:
   * no buffer of the request's size is allocated, which for large reads is what the garbage
   * collector would otherwise spend its time on.
   */
  async read(offset: number, length: number, into?: Buffer): Promise<Buffer> {
    this.checkRange(offset, length);
    if (into && into.length !== length) throw new RangeError(`read into a buffer of ${into.length} bytes, not ${length}`);
    if (length === 0) return into ?? Buffer.alloc(0);
    if (length <= this.maxRequest) return (await this.request(NBD_CMD_READ, 0, offset, length, undefined, into))!;
    const out = into ?? Buffer.allocUnsafe(length);
    const parts: Promise<unknown>[] = [];
    for (let at = 0; at < length; at += this.maxRequest) {
      const n = Math.min(this.maxRequest, length - at);
      parts.push(this.request(NBD_CMD_READ, 0, offset + at, n, undefined, out.subarray(at, at + n)));
    }
    await Promise.all(parts);
    return out;
  }

  async write(offset: number, data: Buffer, opts?: { fua?: boolean }): Promise<void> {
    this.checkRange(offset, data.length);
    if (this.readOnly) throw new NbdRequestError(1, 'export is read-only');
    if (data.length === 0) return;
    const parts: Promise<unknown>[] = [];
    for (let at = 0; at < data.length; at += this.maxRequest) {
      const n = Math.min(this.maxRequest, data.length - at);
      parts.push(this.request(NBD_CMD_WRITE, this.fuaFlag(opts?.fua), offset + at, n, data.subarray(at, at + n)));
    }
    await Promise.all(parts);
    await this.flushIfNoFua(opts?.fua);
  }

  /** WRITE_ZEROES when the server offers it, else plain writes of zeroes. */
  async writeZeroes(offset: number, length: number, opts?: { fua?: boolean; noHole?: boolean }): Promise<void> {
    this.checkRange(offset, length);
    if (length === 0) return;
    if (!this.canWriteZeroes) {
      const zeroes = Buffer.alloc(Math.min(length, this.maxRequest));
      const parts: Promise<void>[] = [];
      for (let at = 0; at < length; at += zeroes.length) {
        parts.push(this.write(offset + at, zeroes.subarray(0, Math.min(zeroes.length, length - at)), opts));
      }
      await Promise.all(parts);
      return;
    }
    const flags = this.fuaFlag(opts?.fua) | (opts?.noHole ? NBD_CMD_FLAG_NO_HOLE : 0);
    // proto.md limits WRITE_ZEROES to the maximum block size too.
    await this.splitNoPayload(NBD_CMD_WRITE_ZEROES, flags, offset, length, this.maxRequest);
    await this.flushIfNoFua(opts?.fua);
  }

  async trim(offset: number, length: number, opts?: { fua?: boolean }): Promise<void> {
    this.checkRange(offset, length);
    if (!this.canTrim) throw new NbdRequestError(22, 'server does not support TRIM');
    if (length === 0) return;
    await this.splitNoPayload(NBD_CMD_TRIM, this.fuaFlag(opts?.fua), offset, length, MAX_NO_PAYLOAD_REQUEST);
    await this.flushIfNoFua(opts?.fua);
  }

  async flush(): Promise<void> {
    if (!this.canFlush) return; // without SEND_FLUSH the server persists writes by itself
    await this.request(NBD_CMD_FLUSH, 0, 0, 0);
  }

  /**
   * Soft disconnect: waits for requests in flight, sends NBD_CMD_DISC and closes. Requests
   * issued afterwards fail.
   */
  async disconnect(): Promise<void> {
    if (this.disconnecting) return this.closed;
    this.disconnecting = true;
    if (this.pending.size > 0 || this.waiting.length > 0) {
      await new Promise<void>((resolve) => this.idleWaiters.push(resolve));
    }
    if (!this.failure && !this.socket.destroyed) {
      const handle = this.nextHandle++;
      this.socket.write(encodeRequestHeader({ type: NBD_CMD_DISC, flags: 0, handle, offset: 0, length: 0 }));
      this.socket.end();
    }
    await this.closed;
  }

  /** Hard disconnect: everything in flight fails. */
  destroy(): void {
    this.fail(new Error('NBD client destroyed'));
    this.socket.destroy();
  }

  private fuaFlag(fua: boolean | undefined): number {
    return fua && this.canFua ? NBD_CMD_FLAG_FUA : 0;
  }

  /** Without FUA support, a flush after the write gives the same guarantee. */
  private async flushIfNoFua(fua: boolean | undefined): Promise<void> {
    if (fua && !this.canFua) await this.flush();
  }

  private checkRange(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      throw new RangeError(`bad range ${offset}+${length}`);
    }
    if (offset + length > this.exportSize) {
      throw new RangeError(`range ${offset}+${length} beyond the export size ${this.exportSize}`);
    }
  }

  private async splitNoPayload(type: number, flags: number, offset: number, length: number, max: number): Promise<void> {
    const align = this.blockSize?.minimum ?? 1;
    const step = Math.max(align, max - (max % align));
    const parts: Promise<unknown>[] = [];
    for (let at = 0; at < length; at += step) {
      parts.push(this.request(type, flags, offset + at, Math.min(step, length - at)));
    }
    await Promise.all(parts);
  }

  /** Sends one request and resolves with its data (READ) when the reply is complete. */
  async request(type: number, flags: number, offset: number, length: number, payload?: Buffer, into?: Buffer): Promise<Buffer | undefined> {
    if (this.failure) throw this.failure;
    if (this.disconnecting) throw new Error('NBD client is disconnecting');
    while (this.pending.size >= this.maxInFlight) {
      await new Promise<void>((resolve) => this.waiting.push(resolve));
      if (this.failure) throw this.failure;
    }
    const handle = this.nextHandle++;
    const result = new Promise<Buffer | undefined>((resolve, reject) => {
      this.pending.set(handle, { type, handle, offset, length, resolve, reject, covered: 0, into: into !== undefined, ...(into ? { data: into } : {}) });
    });
    const header = encodeRequestHeader({ type, flags, handle, offset, length });
    if (!this.corked) {
      // Requests issued in the same tick leave in one writev.
      this.corked = true;
      this.socket.cork();
      process.nextTick(() => {
        this.corked = false;
        this.socket.uncork();
      });
    }
    this.socket.write(header);
    if (payload && payload.length > 0) this.socket.write(payload);
    return result;
  }

  private finish(p: Pending, err?: Error, data?: Buffer): void {
    this.pending.delete(p.handle);
    if (err) p.reject(err);
    else p.resolve(data);
    const next = this.waiting.shift();
    if (next) next();
    else if (this.pending.size === 0) for (const w of this.idleWaiters.splice(0)) w();
  }

  private fail(err: Error): void {
    if (this.failure) return;
    this.failure = err;
    for (const p of [...this.pending.values()]) this.finish(p, err);
    for (const w of this.waiting.splice(0)) w();
    for (const w of this.idleWaiters.splice(0)) w();
    this.queue.clear();
  }

  private protocolError(message: string): void {
    this.fail(new ProtocolError(message));
    this.socket.destroy();
  }

  private onSocketData(d: Buffer): void {
    const st = this.state;
    if (st.kind === 'fill' && this.queue.length === 0) {
      // Bulk read data goes straight from the socket chunk into its destination.
      const n = Math.min(st.target.length - st.filled, d.length);
      d.copy(st.target, st.filled, 0, n);
      st.filled += n;
      if (st.filled < st.target.length) return;
      this.state = { kind: 'magic' };
      st.done();
      d = d.subarray(n);
      if (d.length === 0) return;
    }
    this.queue.push(d);
    this.parse();
  }

  /** Consumes every complete reply (or reply chunk) buffered so far. */
  private parse(): void {
    const q = this.queue;
    while (!this.failure) {
      const st = this.state;
      if (st.kind === 'fill') {
        const n = Math.min(st.target.length - st.filled, q.length);
        q.takeInto(st.target, st.filled, n);
        st.filled += n;
        if (st.filled < st.target.length) return;
        this.state = { kind: 'magic' };
        st.done();
        continue;
      }
      if (st.kind === 'chunk-payload') {
        if (q.length < st.length) return;
        this.state = { kind: 'magic' };
        this.onChunk(st.flags, st.type, st.handle, q.take(st.length));
        continue;
      }
      if (st.kind === 'data-offset') {
        if (q.length < 8) return;
        this.state = { kind: 'magic' };
        this.onDataChunk(st.flags, st.handle, readU64(q.take(8), 0), st.length - 8);
        continue;
      }
      if (q.length < 4) return;
      const magic = q.peekUInt32BE(0);
      if (magic === NBD_SIMPLE_REPLY_MAGIC) {
        if (q.length < SIMPLE_REPLY_HEADER_SIZE) return;
        const h = q.take(SIMPLE_REPLY_HEADER_SIZE);
        const error = h.readUInt32BE(4);
        const handle = h.readBigUInt64BE(8);
        const p = this.pending.get(handle);
        if (!p) return this.protocolError(`reply for unknown handle ${handle}`);
        if (error !== 0) {
          this.finish(p, this.requestError(p, error));
        } else if (p.type === NBD_CMD_READ) {
          if (this.structuredReplies) return this.protocolError('simple reply to a READ after structured replies were negotiated');
          if (p.into) {
            const target = p.data!;
            this.state = { kind: 'fill', target, filled: 0, done: () => this.finish(p, undefined, target) };
          } else if (q.length >= p.length) {
            // Already here: usually a view of one socket chunk, no copy.
            this.finish(p, undefined, q.take(p.length));
          } else {
            const target = Buffer.allocUnsafe(p.length);
            this.state = { kind: 'fill', target, filled: 0, done: () => this.finish(p, undefined, target) };
          }
        } else {
          this.finish(p);
        }
      } else if (magic === NBD_STRUCTURED_REPLY_MAGIC) {
        if (!this.structuredReplies) return this.protocolError('structured reply that was never negotiated');
        if (q.length < STRUCTURED_REPLY_HEADER_SIZE) return;
        const h = q.take(STRUCTURED_REPLY_HEADER_SIZE);
        const flags = h.readUInt16BE(4);
        const type = h.readUInt16BE(6);
        const handle = h.readBigUInt64BE(8);
        const length = h.readUInt32BE(16);
        const p = this.pending.get(handle);
        if (!p) return this.protocolError(`reply chunk for unknown handle ${handle}`);
        // Bound every payload before buffering it, so a broken server cannot make us hoard memory.
        const limit =
          type === NBD_REPLY_TYPE_OFFSET_DATA ? 8 + p.length
          : type === NBD_REPLY_TYPE_OFFSET_HOLE ? 12
          : type === NBD_REPLY_TYPE_NONE ? 0
          : type & NBD_REPLY_TYPE_IS_ERROR ? 65536
          : -1;
        if (limit < 0) return this.protocolError(`unknown reply chunk type ${type}`);
        if (length > limit) return this.protocolError(`reply chunk type ${type} with ${length} bytes`);
        if (type === NBD_REPLY_TYPE_OFFSET_DATA) {
          if (p.type !== NBD_CMD_READ) return this.protocolError(`data chunk for ${commandName(p.type)}`);
          if (length < 9) return this.protocolError('data chunk shorter than 9 bytes');
          this.state = { kind: 'data-offset', flags, handle, length };
        } else if (length === 0) {
          this.onChunk(flags, type, handle, Buffer.alloc(0));
        } else {
          this.state = { kind: 'chunk-payload', flags, type, handle, length };
        }
      } else {
        return this.protocolError(`bad reply magic 0x${magic.toString(16)}`);
      }
    }
  }

  /** An OFFSET_DATA chunk whose offset has been read; its n data bytes follow. */
  private onDataChunk(flags: number, handle: bigint, at: number, n: number): void {
    const p = this.pending.get(handle)!;
    if (at < p.offset || at + n > p.offset + p.length) return this.protocolError('data chunk outside the request');
    const done = (): void => {
      p.covered += n;
      this.chunkDone(p, flags);
    };
    const q = this.queue;
    if (!p.into && n === p.length && p.covered === 0 && q.length >= n) {
      // The usual single chunk, already received: hand it over as it is.
      p.data = q.take(n);
      return done();
    }
    if (!p.data) p.data = n === p.length ? Buffer.allocUnsafe(n) : Buffer.alloc(p.length);
    const target = p.data.subarray(at - p.offset, at - p.offset + n);
    this.state = { kind: 'fill', target, filled: 0, done };
  }

  private onChunk(flags: number, type: number, handle: bigint, payload: Buffer): void {
    const p = this.pending.get(handle)!;
    if (type & NBD_REPLY_TYPE_IS_ERROR) {
      let e;
      try {
        e = decodeErrorChunkPayload(type, payload);
      } catch (err) {
        return this.protocolError((err as Error).message);
      }
      p.error ??= this.requestError(p, e.error, e.message);
    } else if (type === NBD_REPLY_TYPE_OFFSET_HOLE) {
      if (p.type !== NBD_CMD_READ) return this.protocolError(`hole chunk for ${commandName(p.type)}`);
      if (payload.length !== 12) return this.protocolError('hole chunk is not 12 bytes');
      const at = readU64(payload, 0);
      const n = payload.readUInt32BE(8);
      if (at < p.offset || at + n > p.offset + p.length) return this.protocolError('hole chunk outside the request');
      p.data ??= Buffer.alloc(p.length);
      p.data.fill(0, at - p.offset, at - p.offset + n);
      p.covered += n;
    }
    this.chunkDone(p, flags);
  }

  private chunkDone(p: Pending, flags: number): void {
    if (!(flags & NBD_REPLY_FLAG_DONE)) return;
    if (p.error) return this.finish(p, p.error);
    if (p.type === NBD_CMD_READ) {
      if (p.covered !== p.length) return this.protocolError(`read reply covered ${p.covered} of ${p.length} bytes`);
      return this.finish(p, undefined, p.data ?? Buffer.alloc(0));
    }
    this.finish(p);
  }

  private requestError(p: Pending, errno: number, message?: string): NbdRequestError {
    if (errno === NBD_ESHUTDOWN && !this.disconnecting) {
      // proto.md: on ESHUTDOWN the client must initiate a soft disconnect.
      queueMicrotask(() => void this.disconnect().catch(() => {}));
    }
    const where = `${commandName(p.type)} offset=${p.offset} length=${p.length}`;
    return new NbdRequestError(errno, message ? `${message} (${where})` : where);
  }
}
