/**
 * Which read misses are filled into the cache, and how fill work is kept from slowing replies.
 *
 * A fill is a copy into the cache of data a miss has already read; the reply never waits for it.
 * Fills run one at a time, so they take at most one thread of the I/O pool from the requests, and
 * the bytes admitted but not yet in the cache are bounded: when the cache device cannot keep up
 * (the page cache throttling a fast stream of misses, say), further misses are not filled at all
 * rather than held in memory. So are the rates of fill keys and bytes (FILL_KEYS_PER_SEC, FILL_BYTES_PER_SEC).
 *
 * Large sequential read streams are not filled either (bcache's sequential_cutoff): one pass over
 * a big file would otherwise push out everything else.
 *
 * The cutoff applies to fills only, not to writes as in bcache. A write that bypassed the cache
 * would go to the backing device out of log order: write-back replays every logged kset's dirty
 * keys (spec section 6, from the kset itself, not from the index), so an older dirty key for the
 * same range would later overwrite the bypassed data; and the backing device would no longer be a
 * crash-consistent prefix of the log. Making that safe would mean waiting for write-back to pass
 * every overlapping dirty key before each bypassed write, which costs more than it saves.
 */

/** bcache's default sequential_cutoff. */
export const SEQUENTIAL_CUTOFF_DEFAULT = 4 * 1024 * 1024;
/** Fill bytes admitted and not yet in the cache, beyond which a miss is not filled. */
export const FILL_BACKLOG_MAX = 8 * 1024 * 1024;
/**
 * Fill keys per second, at most, after a burst of one kset's worth (128). Every 128 keys make the
 * log write a kset, and each kset costs a sync of the cache device before it, then write-back's
 * backing flush and tail updates (about ten syncs in all, measured with strace): on a cache device
 * that shares a disk with the backing device those syncs, not the copies, are what made a miss
 * slow (4 KiB misses at qd1 ran at a sixth of nbdkit file's rate with every miss filled).
 */
export const FILL_KEYS_PER_SEC = 256;
const FILL_KEYS_BURST = 128;
/**
 * Fill bytes per second, at most, after a burst of 32 MiB. Every filled byte is written to the
 * cache device a second time after the backing read; for large misses that copy, and the cache
 * device's write-back to disk, cost about as much as the miss itself (1 MiB misses at qd4 lost
 * a third of their rate with every miss filled). At this rate a 1 GiB cache still warms in 16 s.
 */
export const FILL_BYTES_PER_SEC = 64 * 1024 * 1024;
const FILL_BYTES_BURST = 32 * 1024 * 1024;
/** Streams remembered for the cutoff; the least recently continued one is forgotten first. */
const STREAMS_TRACKED = 64;

export class FillGate {
  private cutoff: number;
  /** End offset of each recent read stream -> bytes read in that stream so far (Map order: least recent first). */
  private readonly streams = new Map<number, number>();
  private backlogBytes = 0;
  private queue: Promise<void> = Promise.resolve();
  private readonly keyRate = new RateLimit(FILL_KEYS_PER_SEC, FILL_KEYS_BURST);
  private readonly byteRate = new RateLimit(FILL_BYTES_PER_SEC, FILL_BYTES_BURST);

  constructor(
    sequentialCutoff = SEQUENTIAL_CUTOFF_DEFAULT,
    private readonly backlogMax = FILL_BACKLOG_MAX,
  ) {
    this.cutoff = checkCutoff(sequentialCutoff);
  }

  get sequentialCutoff(): number {
    return this.cutoff;
  }

  set sequentialCutoff(n: number) {
    this.cutoff = checkCutoff(n);
    if (n === 0) this.streams.clear();
  }

  /** Bytes of fill work admitted and not yet finished. */
  get backlog(): number {
    return this.backlogBytes;
  }

  /**
   * Note a read of [off, off+len); true when it carries its stream past the cutoff, so that its
   * misses are not to be filled. A read that starts where a remembered one ended continues it.
   */
  beyondCutoff(off: number, len: number): boolean {
    if (this.cutoff === 0) return false;
    const before = this.streams.get(off) ?? 0;
    if (before > 0) this.streams.delete(off);
    const total = before + len;
    this.streams.delete(off + len);
    this.streams.set(off + len, total);
    if (this.streams.size > STREAMS_TRACKED) this.streams.delete(this.streams.keys().next().value!);
    return total > this.cutoff;
  }

  /**
   * Reserve `len` bytes of fill work; false when the backlog is full or the key rate is spent. A
   * fill larger than the whole limit still goes when nothing else is waiting, or it could never be filled.
   */
  admit(len: number): boolean {
    if (this.backlogBytes > 0 && this.backlogBytes + len > this.backlogMax) return false;
    const now = performance.now();
    if (!this.keyRate.has(1, now) || !this.byteRate.has(len, now)) return false;
    this.keyRate.take(1);
    this.byteRate.take(len);
    this.backlogBytes += len;
    return true;
  }

  /** Give back a reservation whose fill will not run (its backing read failed). */
  release(len: number): void {
    this.backlogBytes -= len;
  }

  /** Run an admitted fill after the ones before it; its reservation ends with it. */
  run(len: number, work: () => Promise<void>): Promise<void> {
    const p = this.queue.then(work).finally(() => {
      this.backlogBytes -= len;
    });
    this.queue = p.catch(() => undefined);
    return p;
  }
}

/** A token bucket: `perSec` tokens a second, at most `burst` saved up. */
class RateLimit {
  private tokens: number;
  private at = performance.now();

  constructor(
    private readonly perSec: number,
    private readonly burst: number,
  ) {
    this.tokens = burst;
  }

  /** Top up to `now` (ms); are there `n` tokens? A request larger than the burst waits for a full bucket. */
  has(n: number, now: number): boolean {
    this.tokens = Math.min(this.burst, this.tokens + ((now - this.at) * this.perSec) / 1000);
    this.at = now;
    return this.tokens >= Math.min(n, this.burst);
  }

  take(n: number): void {
    this.tokens -= n;
  }
}

function checkCutoff(n: number): number {
  if (!Number.isSafeInteger(n) || n < 0) throw new RangeError(`sequential_cutoff must be a whole number of bytes >= 0, not ${n}`);
  return n;
}
