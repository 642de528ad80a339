/**
 * The backing device on an NBD export (nbdkit, qemu-nbd, rbd-nbd, a storage appliance), over one
 * or more NbdClient connections.
 *
 * - Connections that drop are re-opened in the background with back-off. A request whose
 *   connection is lost is sent again on another (or the re-opened) connection; a request still
 *   without an answer `requestTimeoutMs` after it was issued fails with EIO. Error replies of the
 *   server (EIO, ENOSPC...) are passed on as they are, never retried here: the engine decides.
 * - Nothing acknowledged is lost: write() resolves only once the server replied. But a server
 *   that crashed may have dropped writes it acknowledged and had not flushed, and a flush on the
 *   new connection says nothing about them. So after any lost connection, the next flush()
 *   rejects with EIO (once): the write-back engine then retries the whole kset, sending its writes
 *   again, and only a flush with no loss since those writes counts.
 * - nbds:// and nbds+unix:// URIs: every connection, re-opened ones included, starts with
 *   NBD_OPT_STARTTLS (pre-shared keys or X.509, as the URI's libnbd query parameters say).
 * - With NBD_FLAG_CAN_MULTI_CONN the adapter opens several connections and spreads requests
 *   round-robin, so write-back and miss reads overlap; a flush on any connection then covers
 *   the writes completed on all of them. Without it, one connection.
 *
 * src/backing sits below the cache: this file imports the NBD client and codec, never the cache,
 * the NBD server or the CLI.
 */
import { connectNbd, parseNbdUri, type NbdClient, type NbdTarget } from '../nbd/client.js';
import { NBD_ESHUTDOWN, NbdRequestError } from '../nbd/protocol.js';
import type { BackingDevice, BackingState } from './backing.js';

export interface NbdBackingOptions {
  /** Connections to open when the server offers CAN_MULTI_CONN (default 4). */
  connections?: number;
  /** Give up on the first connection after this long (default 5 s). Later connections retry forever. */
  connectTimeoutMs?: number;
  /** A request without an answer this long after it was issued, reconnections included, fails with EIO (default 30 s). */
  requestTimeoutMs?: number;
  /** Reconnection back-off: first delay and the ceiling (defaults 100 ms and 2 s). */
  reconnectMinMs?: number;
  reconnectMaxMs?: number;
  /** Requests in flight per connection (default 64). */
  maxInFlight?: number;
  /** Connection events (lost, restored), one line each without a trailing newline. */
  log?: (message: string) => void;
}

export interface NbdBackingState extends BackingState {
  kind: 'nbd';
  /** 'connected': every connection up; 'degraded': some; 'disconnected': none; 'closed'. */
  state: 'connected' | 'degraded' | 'disconnected' | 'closed';
  /** Connections up now, and how many the adapter keeps. */
  connections: number;
  maxConnections: number;
  multiConn: boolean;
  /** Connections lost, and connections re-opened after a loss. */
  disconnects: number;
  reconnects: number;
  /** Requests sent again after their connection was lost; requests failed for want of an answer. */
  retries: number;
  timeouts: number;
  /** Flushes refused because a connection was lost since the previous flush. */
  flushesRefused: number;
  /** Requests issued and not yet answered (including those waiting for a connection). */
  pending: number;
  lastError: string | null;
  /** When lastError happened (ISO time), and when the backing was last seen with no connection. */
  lastErrorAt: string | null;
  disconnectedSince: string | null;
}

interface Slot {
  id: number;
  client: NbdClient | null;
  reconnecting: boolean;
}

/** An error the NBD server layer and the engine treat as EIO. */
function eio(message: string): Error {
  return Object.assign(new Error(message), { code: 'EIO' });
}

function message(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/** Lost connection (or a server shutting down) rather than an answer to this request. */
function isConnectionError(err: unknown): boolean {
  if (err instanceof NbdRequestError) return err.errno === NBD_ESHUTDOWN;
  if (err instanceof RangeError) return false;
  return true;
}

function describeTarget(t: NbdTarget): string {
  return t.transport === 'tcp' ? `${t.host}:${t.port}` : t.path;
}

/** Socket-level failures worth another try while the first connection is being made. */
function isNotListening(err: unknown): boolean {
  const code = (err as { code?: unknown })?.code;
  return code === 'ECONNREFUSED' || code === 'ENOENT' || code === 'EAGAIN';
}

const sleep = (ms: number): Promise<void> =>
  new Promise((r) => {
    const t = setTimeout(r, ms);
    t.unref();
  });

export class NbdBacking implements BackingDevice {
  readonly name: string;
  private readonly target: NbdTarget;
  private readonly slots: Slot[] = [];
  private readonly bytes: number;
  private readonly requestTimeoutMs: number;
  private readonly connectTimeoutMs: number;
  private readonly reconnectMinMs: number;
  private readonly reconnectMaxMs: number;
  private readonly maxInFlight: number;
  private readonly log: (m: string) => void;
  private multiConn: boolean;
  private rr = 0;
  private closed = false;
  /** Goes up by one for every connection lost; flush() compares it with flushEpoch. */
  private lossEpoch = 0;
  private flushEpoch = 0;
  /** Writes issued and not yet settled: a flush waits for those issued before it. */
  private readonly writesInFlight = new Set<Promise<unknown>>();
  /** Callers waiting for any connection to come up. */
  private connWaiters: Array<() => void> = [];
  private pending = 0;
  private stats = { disconnects: 0, reconnects: 0, retries: 0, timeouts: 0, flushesRefused: 0 };
  private lastError: string | null = null;
  private lastErrorAt: string | null = null;
  private disconnectedSince: string | null = null;

  private constructor(name: string, target: NbdTarget, first: NbdClient, opts: NbdBackingOptions) {
    this.name = name;
    this.target = target;
    this.bytes = first.size();
    this.requestTimeoutMs = opts.requestTimeoutMs ?? 30_000;
    this.connectTimeoutMs = opts.connectTimeoutMs ?? 5_000;
    this.reconnectMinMs = opts.reconnectMinMs ?? 100;
    this.reconnectMaxMs = opts.reconnectMaxMs ?? 2_000;
    this.maxInFlight = opts.maxInFlight ?? 64;
    this.log = opts.log ?? (() => undefined);
    const want = Math.max(1, Math.floor(opts.connections ?? 4));
    this.multiConn = first.canMultiConn && want > 1;
    const n = this.multiConn ? want : 1;
    for (let i = 0; i < n; i++) this.slots.push({ id: i, client: null, reconnecting: false });
    this.attach(this.slots[0]!, first);
  }

  static async open(uri: string, opts: NbdBackingOptions = {}): Promise<NbdBacking> {
    const target = parseNbdUri(uri);
    const timeout = opts.connectTimeoutMs ?? 5_000;
    const deadline = Date.now() + timeout;
    let first: NbdClient;
    for (let delay = 50; ; delay = Math.min(delay * 2, 500)) {
      try {
        first = await connectNbd(target, { connectTimeoutMs: Math.max(1, deadline - Date.now()), maxInFlight: opts.maxInFlight });
        break;
      } catch (err) {
        // Nothing listening yet: the server may be starting with us. Anything else (a refused
        // export, a broken handshake) will not get better by asking again.
        if (!isNotListening(err) || Date.now() + delay >= deadline) {
          throw Object.assign(new Error(`cannot open the NBD backing device ${uri} (${describeTarget(target)}): ${message(err)}`), {
            code: (err as { code?: unknown })?.code ?? 'EIO',
            cause: err,
          });
        }
        await new Promise((r) => setTimeout(r, delay));
      }
    }
    const bad = NbdBacking.unusable(first, null);
    if (bad) {
      first.destroy();
      throw new Error(`cannot use the NBD backing device ${uri}: ${bad}`);
    }
    const b = new NbdBacking(uri, target, first, opts);
    // The other connections are opened together; one that fails keeps trying in the background.
    await Promise.all(
      b.slots
        .filter((s) => !s.client)
        .map(async (s) => {
          try {
            const c = await connectNbd(target, { connectTimeoutMs: b.connectTimeoutMs, maxInFlight: b.maxInFlight });
            const why = NbdBacking.unusable(c, b.bytes) ?? (c.canMultiConn ? null : 'no CAN_MULTI_CONN on this connection');
            if (why) {
              c.destroy();
              throw new Error(why);
            }
            b.attach(s, c);
          } catch (err) {
            b.noteError(`connection ${s.id} to ${describeTarget(target)}: ${message(err)}`);
            void b.reconnect(s, false);
          }
        }),
    );
    return b;
  }

  /** Why a connection cannot serve as (this) backing device, or null. */
  private static unusable(c: NbdClient, size: number | null): string | null {
    if (c.readOnly) return 'the export is read-only';
    if (size !== null && c.size() !== size) return `the export size changed from ${size} to ${c.size()} bytes`;
    if (c.size() <= 0) return 'the export is empty';
    return null;
  }

  size(): number {
    return this.bytes;
  }

  async read(buf: Buffer, offset: number): Promise<void> {
    this.checkRange('read', offset, buf.length);
    if (buf.length === 0) return;
    // Straight into the caller's buffer: no second buffer of the read's size, no copy.
    const data = await this.run(`read ${offset}+${buf.length}`, (c) => c.read(offset, buf.length, buf));
    if (data !== buf) data.copy(buf);
  }

  async write(data: Buffer, offset: number): Promise<void> {
    this.checkRange('write', offset, data.length);
    if (data.length === 0) return;
    const p = this.run(`write ${offset}+${data.length}`, (c) => c.write(offset, data));
    this.writesInFlight.add(p);
    try {
      await p;
    } finally {
      this.writesInFlight.delete(p);
    }
  }

  async flush(): Promise<void> {
    this.usable();
    // Writes issued before this flush are covered by it: wait for their answers first.
    if (this.writesInFlight.size > 0) await Promise.allSettled([...this.writesInFlight]);
    this.refuseFlushAfterLoss();
    const epoch = this.lossEpoch;
    try {
      // A flush is not sent again on another connection: a lost one means the writes before it
      // must be sent again too, which only the caller can do.
      await this.run('flush', (c) => c.flush(), false);
    } catch (err) {
      if (this.lossEpoch !== epoch) this.refuseFlushAfterLoss();
      throw err;
    }
    // A connection lost while the flush was in flight may have held writes it did not cover.
    this.refuseFlushAfterLoss();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const w of this.connWaiters.splice(0)) w();
    const clients = this.slots.map((s) => s.client).filter((c): c is NbdClient => c !== null);
    for (const s of this.slots) s.client = null;
    await Promise.all(
      clients.map(async (c) => {
        const t = setTimeout(() => c.destroy(), 2000);
        try {
          await c.disconnect();
        } catch {
          c.destroy();
        } finally {
          clearTimeout(t);
        }
      }),
    );
  }

  state(): NbdBackingState {
    const up = this.slots.filter((s) => s.client !== null).length;
    return {
      kind: 'nbd',
      name: this.name,
      state: this.closed ? 'closed' : up === this.slots.length ? 'connected' : up > 0 ? 'degraded' : 'disconnected',
      connected: !this.closed && up > 0,
      connections: up,
      maxConnections: this.slots.length,
      multiConn: this.multiConn,
      ...this.stats,
      pending: this.pending,
      lastError: this.lastError,
      lastErrorAt: this.lastErrorAt,
      disconnectedSince: this.disconnectedSince,
    };
  }

  /** Throws (once per loss) when a connection was lost since the last flush. */
  private refuseFlushAfterLoss(): void {
    if (this.lossEpoch === this.flushEpoch) return;
    this.flushEpoch = this.lossEpoch;
    this.stats.flushesRefused++;
    throw eio(`flush refused: the connection to the NBD backing device ${this.name} was lost since the last flush; writes it acknowledged may not be durable and must be sent again`);
  }

  private usable(): void {
    if (this.closed) throw eio(`the NBD backing device ${this.name} is closed`);
  }

  private checkRange(what: string, offset: number, length: number): void {
    this.usable();
    if (!Number.isSafeInteger(offset) || offset < 0 || offset + length > this.bytes) {
      throw new RangeError(`NBD backing device ${this.name}: ${what} of ${length} bytes at ${offset} is outside the device (${this.bytes} bytes)`);
    }
  }

  private noteError(text: string): void {
    this.lastError = text;
    this.lastErrorAt = new Date().toISOString();
  }

  /**
   * Runs `op` on a live connection; on a lost connection, again on another one until the
   * deadline. A request still unanswered at the deadline fails with EIO, and its connection,
   * which looks hung, is dropped and re-opened.
   */
  private async run<T>(what: string, op: (c: NbdClient) => Promise<T>, retry = true): Promise<T> {
    this.usable();
    const deadline = Date.now() + this.requestTimeoutMs;
    this.pending++;
    try {
      for (let attempt = 0; ; attempt++) {
        const { slot, client } = await this.pick(deadline, what);
        let timedOut = false;
        const timer = setTimeout(() => {
          timedOut = true;
          this.lost(slot, client, new Error(`no answer to ${what} within ${this.requestTimeoutMs} ms`));
        }, Math.max(0, deadline - Date.now()));
        try {
          if (attempt > 0) this.stats.retries++;
          return await op(client);
        } catch (err) {
          if (!isConnectionError(err)) throw err;
          this.lost(slot, client, err);
          if (this.closed) throw eio(`the NBD backing device ${this.name} was closed during ${what}`);
          if (timedOut || Date.now() >= deadline) {
            this.stats.timeouts++;
            throw eio(`NBD backing device ${this.name}: ${what} failed: no answer within ${this.requestTimeoutMs} ms (${message(err)})`);
          }
          if (!retry) throw eio(`NBD backing device ${this.name}: ${what} failed: ${message(err)}`);
        } finally {
          clearTimeout(timer);
        }
      }
    } finally {
      this.pending--;
    }
  }

  /** The next live connection, round-robin; waits for one until the deadline. */
  private async pick(deadline: number, what: string): Promise<{ slot: Slot; client: NbdClient }> {
    for (;;) {
      this.usable();
      const n = this.slots.length;
      for (let i = 0; i < n; i++) {
        const slot = this.slots[(this.rr + i) % n]!;
        if (slot.client) {
          this.rr = (this.rr + i + 1) % n;
          return { slot, client: slot.client };
        }
      }
      const left = deadline - Date.now();
      if (left <= 0) {
        this.stats.timeouts++;
        throw eio(`NBD backing device ${this.name}: ${what} failed: not connected for ${this.requestTimeoutMs} ms (${this.lastError ?? 'connection lost'})`);
      }
      await new Promise<void>((resolve) => {
        const t = setTimeout(done, left);
        function done(): void {
          clearTimeout(t);
          resolve();
        }
        this.connWaiters.push(done);
      });
    }
  }

  private attach(slot: Slot, client: NbdClient): void {
    slot.client = client;
    this.disconnectedSince = null;
    void client.closed.then(() => this.lost(slot, client, new Error('connection closed')));
    for (const w of this.connWaiters.splice(0)) w();
  }

  /** A connection is gone (or is given up on): count it once, drop it, re-open it in the background. */
  private lost(slot: Slot, client: NbdClient, err: unknown): void {
    client.destroy();
    if (slot.client !== client) return;
    slot.client = null;
    if (this.closed) return;
    this.lossEpoch++;
    this.stats.disconnects++;
    const text = `connection ${slot.id} to ${describeTarget(this.target)} lost: ${message(err)}`;
    this.noteError(text);
    if (this.slots.every((s) => !s.client)) this.disconnectedSince ??= new Date().toISOString();
    this.log(`backing ${this.name}: ${text}; reconnecting`);
    void this.reconnect(slot, true);
  }

  private async reconnect(slot: Slot, afterLoss: boolean): Promise<void> {
    if (slot.reconnecting) return;
    slot.reconnecting = true;
    try {
      let delay = afterLoss ? this.reconnectMinMs : 0;
      let failures = 0;
      while (!this.closed && this.slots.includes(slot)) {
        if (delay > 0) await sleep(delay);
        delay = Math.min(Math.max(delay * 2, this.reconnectMinMs), this.reconnectMaxMs);
        if (this.closed) return;
        let c: NbdClient;
        try {
          c = await connectNbd(this.target, { connectTimeoutMs: this.connectTimeoutMs, maxInFlight: this.maxInFlight });
        } catch (err) {
          failures++;
          this.noteError(`connection ${slot.id} to ${describeTarget(this.target)}: ${message(err)}`);
          if (failures === 1 && afterLoss) this.log(`backing ${this.name}: reconnecting: ${message(err)}`);
          continue;
        }
        const bad = NbdBacking.unusable(c, this.bytes);
        if (bad || this.closed || !this.slots.includes(slot)) {
          c.destroy();
          if (bad) this.noteError(`connection ${slot.id} to ${describeTarget(this.target)}: ${bad}`);
          continue;
        }
        if (this.slots.length > 1 && !c.canMultiConn) {
          // The server no longer promises that a flush on one connection covers the others:
          // keep this one connection only.
          this.multiConn = false;
          for (const s of this.slots.splice(0)) if (s !== slot && s.client) this.lost(s, s.client, new Error('the server no longer offers CAN_MULTI_CONN'));
          this.slots.push(slot);
        }
        if (afterLoss) {
          this.stats.reconnects++;
          this.log(`backing ${this.name}: connection ${slot.id} restored`);
        }
        this.attach(slot, c);
        return;
      }
    } finally {
      slot.reconnecting = false;
    }
  }
}

export function openNbdBacking(uri: string, opts?: NbdBackingOptions): Promise<NbdBacking> {
  return NbdBacking.open(uri, opts);
}
