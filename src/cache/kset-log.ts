import {
  dataOffset,
  encodeKset,
  encodeLastKset,
  KSET_HEADER_SIZE,
  KSET_KEYS_MAX,
  ksetSize,
  samePosition,
  SEG_DATA_SIZE,
  type Key,
  type Position,
} from '../format/index.js';
import type { Medium } from '../media/medium.js';
import { isNoSpace } from './errors.js';
import type { Segments } from './segments.js';

const LOG_END = Buffer.alloc(KSET_HEADER_SIZE);

export interface KsetLogHooks {
  /** A kset reached the log: write-back has work. */
  written(): void;
  /** The log needs a segment and none is free: make GC and write-back run. */
  needSpace(): void;
  /** A timed or full close failed; the keys stay queued and the next close retries them. */
  error(err: unknown): void;
}

/**
 * The key log. Keys are gathered in one open kset, which is closed (written at key_head) when it
 * holds 128 keys, when a FUA write or a FLUSH asks, and about `closeMs` after its first key.
 *
 * Invariants:
 * - ksets reach the log one at a time, in the order their keys were appended;
 * - the data every key points to is synced before the kset holding it is written (spec 7);
 * - so is the end marker after the kset: replay never reads past a kset a power cut kept;
 * - there is always room after a kset for a LAST kset (the segment switch needs 24 bytes).
 *
 * It also knows which ksets are durable, so that write-back syncs the cache device only when the
 * kset it is about to act on may not be (see isDurable). Every kset (LAST ksets too) gets a write
 * sequence number once its write has completed; a sync that starts after that covers it. Whoever
 * syncs the cache device says so: `const upTo = log.writtenSeq; await medium.sync();
 * log.syncedThrough(upTo)`, or simply `await log.sync()`.
 */
export class KsetLog {
  private open: Key[] = [];
  private timer: NodeJS.Timeout | undefined;
  private chain: Promise<void> = Promise.resolve();
  /** Ksets written since the process started (status). */
  ksetsWritten = 0;
  /**
   * Write sequence number of the last kset (or LAST kset) whose write has completed. 0 stands for
   * the ksets replay found: written by an earlier process, durable only once this one has synced.
   */
  private seqWritten = 0;
  /** Every kset numbered up to this is durable. -1: no sync has completed since open. */
  private seqSynced = -1;
  /**
   * The ksets numbered above seqSynced, oldest first. Short: every batch of kset writes syncs
   * first, which covers all before it, so this holds the last batch and the LAST kset after it.
   */
  private unsynced: Array<{ seg: number; off: number; seq: number }> = [];

  constructor(
    private readonly medium: Medium,
    private readonly physOf: readonly number[],
    private readonly segments: Segments,
    private head: Position,
    private readonly closeMs: number,
    private readonly hooks: KsetLogHooks,
  ) {}

  get keyHead(): Position {
    return { seg: this.head.seg, off: this.head.off };
  }

  get openKeys(): number {
    return this.open.length;
  }

  /** Take this before starting a sync of the cache device; give it to syncedThrough() once it completed. */
  get writtenSeq(): number {
    return this.seqWritten;
  }

  /** A sync that started when writtenSeq was `seq` has completed: every kset numbered up to it is durable. */
  syncedThrough(seq: number): void {
    // Syncs may complete out of order; a later one never undoes what an earlier one covered.
    if (seq <= this.seqSynced) return;
    this.seqSynced = seq;
    while (this.unsynced.length > 0 && this.unsynced[0]!.seq <= seq) this.unsynced.shift();
  }

  /** Sync the cache device (fdatasync) and note the ksets it made durable. */
  async sync(): Promise<void> {
    const upTo = this.seqWritten;
    await this.medium.sync();
    this.syncedThrough(upTo);
  }

  /**
   * Whether the kset at `pos` (one before key_head) is known to be durable: written by this
   * process before a sync that has completed since, or found by replay with a sync completed
   * since open. Only a kset's own write is in question: the sync before it covered everything
   * earlier in the log, the data its keys point to included.
   */
  isDurable(pos: Position): boolean {
    if (this.seqSynced < 0) return false;
    return !this.unsynced.some((k) => samePosition(k, pos));
  }

  private noteWritten(pos: Position): void {
    this.seqWritten++;
    this.unsynced.push({ seg: pos.seg, off: pos.off, seq: this.seqWritten });
  }

  append(key: Key): void {
    this.open.push(key);
    if (this.open.length >= KSET_KEYS_MAX) {
      this.close().catch((e) => this.hooks.error(e));
    } else if (this.open.length === 1 && !this.timer) {
      this.timer = setTimeout(() => {
        this.timer = undefined;
        this.close().catch((e) => this.hooks.error(e));
      }, this.closeMs);
      this.timer.unref();
    }
  }

  /**
   * Close the open kset. Resolves once it and every kset closed before it are in the log (not yet
   * synced: FLUSH syncs after this).
   */
  close(): Promise<void> {
    if (this.timer) {
      clearTimeout(this.timer);
      this.timer = undefined;
    }
    const run = this.chain.then(() => this.writeQueued());
    this.chain = run.catch(() => undefined);
    return run;
  }

  /** Stop the timer without writing (an abandoned cache in tests). */
  stop(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
  }

  private async writeQueued(): Promise<void> {
    while (this.open.length > 0) {
      // Every kset queued by now goes in one batch: when syncs are slower than keys arrive, closes
      // pile up behind the one in flight, and one sync serves them all instead of one each.
      const batch: Key[][] = [];
      for (let i = 0; i < this.open.length; i += KSET_KEYS_MAX) batch.push(this.open.slice(i, i + KSET_KEYS_MAX));
      this.open = [];
      try {
        while (batch.length > 0) await this.writeKsets(batch);
      } catch (err) {
        // The ksets not written yet go back in front of any key appended meanwhile.
        this.open.unshift(...batch.flat());
        throw err;
      }
    }
  }

  /** Write the first ksets of `batch` (as many as fit in the log's segment), taking them off it. */
  private async writeKsets(batch: Key[][]): Promise<void> {
    try {
      await this.writeKsetsAtHead(batch);
    } catch (err) {
      // A sparse cache file on a full filesystem: the rest of this segment has no blocks. The log
      // goes on in another segment, which may have them (the page at key_head has: the end marker
      // was written there), rather than fail every FLUSH from here on.
      if (!isNoSpace(err)) throw err;
      await this.switchSegment();
      await this.writeKsetsAtHead(batch);
    }
  }

  private async writeKsetsAtHead(batch: Key[][]): Promise<void> {
    if (SEG_DATA_SIZE - this.head.off < ksetSize(batch[0]!.length) + KSET_HEADER_SIZE) await this.switchSegment();
    const phys = this.physOf[this.head.seg]!;
    // The ksets that fit in this segment, each leaving room for a LAST kset after it.
    const offs: number[] = [];
    let end = this.head.off;
    while (offs.length < batch.length && SEG_DATA_SIZE - end >= ksetSize(batch[offs.length]!.length) + KSET_HEADER_SIZE) {
      offs.push(end);
      end += ksetSize(batch[offs.length - 1]!.length);
    }
    // An end marker after each kset goes first, made durable by the same sync as the data the keys
    // point to. Written only with the kset, a power cut could keep the kset and lose the marker
    // (another sector), and replay would read on into what an earlier lap left there. A marker
    // inside the batch is overwritten by the next kset, but that write may be lost or torn while
    // the kset before it is kept: replay then meets the marker (or a kset that fails its crc).
    // Every kset's own marker is durable before the kset is written, as with one kset per sync.
    for (let i = 0; i < offs.length; i++) await this.medium.write(LOG_END, dataOffset(phys, offs[i]! + ksetSize(batch[i]!.length)));
    await this.sync();
    for (const off of offs) {
      const keys = batch[0]!;
      await this.medium.write(encodeKset(keys, KSET_HEADER_SIZE), dataOffset(phys, off));
      // Not durable yet: a later sync (the next batch's, a FLUSH's, write-back's) makes it so.
      batch.shift();
      this.noteWritten(this.head);
      this.head = { seg: this.head.seg, off: off + ksetSize(keys.length) };
      this.ksetsWritten++;
      this.hooks.written();
    }
  }

  private async allocateSegment(): Promise<number> {
    let seg = this.segments.allocate(0);
    // Whoever closes this kset (a FLUSH, a FUA write) waits for it.
    const wait = seg === null ? this.segments.spaceWait(200) : null;
    while (seg === null) {
      this.hooks.needSpace();
      await wait!.next();
      seg = this.segments.allocate(0);
    }
    return seg;
  }

  /** Move the log to a fresh segment: end the log there first, then point to it with a LAST kset. */
  private async switchSegment(): Promise<void> {
    let seg: number;
    for (let noSpace = 0; ; noSpace++) {
      seg = await this.allocateSegment();
      try {
        await this.medium.write(LOG_END, dataOffset(this.physOf[seg]!, 0));
        break;
      } catch (err) {
        this.segments.freeLogSegment(seg);
        // No blocks for this one (a sparse file on a full filesystem): another free segment may have them.
        if (!isNoSpace(err) || noSpace >= this.segments.n) throw err;
        this.segments.markNoBlocks(seg);
      }
    }
    try {
      // The new segment's old content must be gone before anything can lead replay into it.
      await this.sync();
      await this.medium.write(encodeLastKset(seg), dataOffset(this.physOf[this.head.seg]!, this.head.off));
    } catch (err) {
      this.segments.freeLogSegment(seg);
      throw err;
    }
    // No sync after the LAST kset either: write-back syncs before following it unless one did.
    this.noteWritten(this.head);
    this.head = { seg, off: 0 };
    this.hooks.written();
  }
}
