import {
  cacheInfoOffset,
  dirtyTailOffset,
  encodeCacheInfo,
  encodeGen,
  encodePosition,
  genOffset,
  keyTailOffset,
  type CacheInfo,
  type Position,
} from '../format/index.js';
import type { Medium } from '../media/medium.js';
import type { SlotState } from './meta.js';

/**
 * A two-slot record on media. Every update goes to the slot other than the newest one, with seq+1,
 * and is synced before the promise resolves: a torn update leaves the previous value readable, and
 * nothing that depends on the new value can act before it is durable.
 */
export class TwoSlotRecord<T> {
  private chain: Promise<void> = Promise.resolve();

  constructor(
    private readonly medium: Medium,
    private readonly slotOffset: (slot: number) => number,
    private readonly encode: (value: T, seq: number) => Buffer,
    private state: SlotState,
  ) {}

  get slotState(): SlotState {
    return { ...this.state };
  }

  /**
   * Updates are serialised so that slots alternate in the order the callers asked.
   *
   * Spec note (section 2, a known deviation that stays): the next write always goes to the slot
   * other than the newest one, with seq + 1. For key_tail and dirty_tail the kernel writes the
   * current slot and moves the index after, so after a reload pcache writes the other slot than
   * the kernel would (the same record, in the other of the two places). The real dm-pcache read
   * such images correctly in every scenario tried (issue 14: thirteen scenarios, reloads and
   * gc_percent changes included): a reader takes the newest valid slot by seq either way.
   */
  store(value: T): Promise<void> {
    const run = this.chain.then(async () => {
      const slot = (this.state.slot === 0 ? 1 : 0) as 0 | 1;
      const seq = (this.state.seq + 1) & 0xff;
      await this.medium.write(this.encode(value, seq), this.slotOffset(slot));
      await this.medium.sync();
      this.state = { slot, seq };
    });
    this.chain = run.catch(() => undefined);
    return run;
  }
}

export function cacheInfoRecord(medium: Medium, state: SlotState): TwoSlotRecord<Omit<CacheInfo, 'seq'>> {
  return new TwoSlotRecord(medium, cacheInfoOffset, (v, seq) => encodeCacheInfo({ ...v, seq }), state);
}

export function keyTailRecord(medium: Medium, state: SlotState): TwoSlotRecord<Position> {
  return new TwoSlotRecord(medium, keyTailOffset, (p, seq) => encodePosition({ seq, seg: p.seg, off: p.off }), state);
}

export function dirtyTailRecord(medium: Medium, state: SlotState): TwoSlotRecord<Position> {
  return new TwoSlotRecord(medium, dirtyTailOffset, (p, seq) => encodePosition({ seq, seg: p.seg, off: p.off }), state);
}

export function genRecord(medium: Medium, phys: number, state: SlotState): TwoSlotRecord<number> {
  return new TwoSlotRecord(medium, (slot) => genOffset(phys, slot), (gen, seq) => encodeGen({ seq, gen }), state);
}
