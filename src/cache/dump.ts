import {
  CACHE_INFO_SIZE,
  cacheInfoOffset,
  dataOffset,
  decodeCacheInfo,
  decodeGen,
  decodePosition,
  decodeSegmentInfo,
  decodeSuperblock,
  dirtyTailOffset,
  flagsDataCrc,
  flagsGcPercent,
  flagsInitDone,
  flagsModeIndex,
  FormatError,
  GEN_SIZE,
  genOffset,
  KEY_FLAG_CLEAN,
  keyTailOffset,
  MAX_SEGMENTS,
  pickSlot,
  POS_SIZE,
  samePosition,
  SB_OFF,
  SB_SIZE,
  SEG_INFO_SIZE,
  segInfoHasNext,
  segInfoOffset,
  segInfoType,
  segmentsFor,
  CACHE_MODES,
  type Decoded,
  type Position,
} from '../format/index.js';
import type { Medium } from '../media/medium.js';
import { walkLog } from './log.js';

/** One slot of a two-slot record as found on media. */
export interface SlotView<T> {
  slot: 0 | 1;
  /** 'empty': all zero (never written); 'bad': bytes that are not a valid record. */
  state: 'ok' | 'empty' | 'bad';
  value?: T;
  error?: string;
}

export interface TwoSlotView<T> {
  slots: [SlotView<T>, SlotView<T>];
  /** The slot the two-slot rule picks (newest valid), or null when neither is valid. */
  current: 0 | 1 | null;
  value: T | null;
}

export interface SuperblockView {
  crc: number;
  flags: number;
  /** 64-bit, as hex. */
  magic: string;
  segNum: number;
  valid: boolean;
  error?: string;
}

export interface CacheInfoView {
  seq: number;
  segId: number;
  nSegs: number;
  flags: number;
  dataCrc: boolean;
  initDone: boolean;
  cacheMode: string;
  gcPercent: number;
}

export interface PositionView {
  seq: number;
  seg: number;
  off: number;
}

export interface SegmentInfoView {
  seq: number;
  flags: number;
  hasNext: boolean;
  type: number;
  nextSeg: number;
}

export interface SegmentView {
  /** Cache segment id (position in the chain). */
  cacheSeg: number;
  /** Physical segment on the device. */
  phys: number;
  info: TwoSlotView<SegmentInfoView>;
  gen: number;
  gens: TwoSlotView<{ seq: number; gen: number }>;
}

export interface KeyView {
  off: number;
  len: number;
  flags: number;
  clean: boolean;
  seg: number;
  segOff: number;
  gen: number;
  dataCrc: number;
  /** Older than its segment's generation (or the segment is unknown): ignored by replay. */
  stale: boolean;
}

export type KsetView =
  | { pos: Position; deviceOffset: number; size: number; last: false; crc: number; keyNum: number; keys: KeyView[] }
  | { pos: Position; deviceOffset: number; size: number; last: true; crc: number; nextSeg: number };

export interface LogView {
  from: Position;
  ksets: KsetView[];
  /** key_head: where the log ends. */
  end: Position;
  /** Why it ends there; normal when the next header simply has no kset magic. */
  endReason: string;
  endNormal: boolean;
  /** Cache segments the log occupies, in order. */
  segments: number[];
}

export interface DumpSummary {
  ksets: number;
  lastKsets: number;
  keys: number;
  cleanKeys: number;
  /** Keys without CLEAN at or after dirty_tail. */
  dirtyKeys: number;
  dirtyBytes: number;
  staleKeys: number;
  logBytes: number;
}

export interface CacheDump {
  device: string;
  deviceSize: number;
  superblock: SuperblockView | null;
  cacheInfo: TwoSlotView<CacheInfoView> | null;
  keyTail: TwoSlotView<PositionView> | null;
  dirtyTail: TwoSlotView<PositionView> | null;
  segments: SegmentView[];
  log: LogView | null;
  summary: DumpSummary;
  /** What kept the dump from going further. */
  errors: string[];
}

function messageOf(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

async function readAt(medium: Medium, offset: number, length: number): Promise<Buffer> {
  const buf = Buffer.alloc(length);
  await medium.read(buf, offset);
  return buf;
}

function allZero(buf: Buffer): boolean {
  for (let i = 0; i < buf.length; i++) if (buf[i] !== 0) return false;
  return true;
}

async function twoSlots<T extends { seq: number }, V>(
  medium: Medium,
  offsets: [number, number],
  size: number,
  decode: (b: Buffer) => Decoded<T>,
  view: (v: T) => V,
): Promise<{ view: TwoSlotView<V>; value: T | null }> {
  const raw = [await readAt(medium, offsets[0], size), await readAt(medium, offsets[1], size)];
  const decoded = raw.map(decode) as [Decoded<T>, Decoded<T>];
  const slots = decoded.map((d, i): SlotView<V> => {
    const slot = i as 0 | 1;
    if (!(d instanceof FormatError)) return { slot, state: 'ok', value: view(d) };
    if (allZero(raw[i]!)) return { slot, state: 'empty' };
    return { slot, state: 'bad', error: d.message };
  }) as [SlotView<V>, SlotView<V>];
  const pick = pickSlot(decoded[0], decoded[1]);
  return {
    view: { slots, current: pick ? pick.slot : null, value: pick ? view(pick.value) : null },
    value: pick ? pick.value : null,
  };
}

function emptySummary(): DumpSummary {
  return { ksets: 0, lastKsets: 0, keys: 0, cleanKeys: 0, dirtyKeys: 0, dirtyBytes: 0, staleKeys: 0, logBytes: 0 };
}

/**
 * Everything on a cache device, decoded for people and tools. Tolerant: each record is shown as
 * found, and a damaged record stops only what depends on it. Never throws for bad media.
 */
export async function dumpCache(medium: Medium): Promise<CacheDump> {
  const dump: CacheDump = {
    device: medium.path,
    deviceSize: medium.size(),
    superblock: null,
    cacheInfo: null,
    keyTail: null,
    dirtyTail: null,
    segments: [],
    log: null,
    summary: emptySummary(),
    errors: [],
  };
  try {
    await fill(medium, dump);
  } catch (err) {
    dump.errors.push(`dump stopped: ${messageOf(err)}`);
  }
  return dump;
}

async function fill(medium: Medium, dump: CacheDump): Promise<void> {
  if (dump.deviceSize < SB_OFF + SB_SIZE) {
    dump.errors.push('the device is too small to hold a superblock');
    return;
  }
  const raw = await readAt(medium, SB_OFF, SB_SIZE);
  const sb = decodeSuperblock(raw, dump.deviceSize);
  dump.superblock = {
    crc: raw.readUInt32LE(0),
    flags: raw.readUInt32LE(4),
    magic: `0x${raw.readBigUInt64LE(8).toString(16)}`,
    segNum: raw.readUInt32LE(16),
    valid: !(sb instanceof FormatError),
    ...(sb instanceof FormatError ? { error: sb.message } : {}),
  };
  // With a bad superblock, what the device can hold still bounds every segment id safely.
  const segNum = sb instanceof FormatError ? Math.max(0, Math.min(segmentsFor(dump.deviceSize), MAX_SEGMENTS)) : sb.segNum;
  if (sb instanceof FormatError) dump.errors.push(sb.message);

  const info = await twoSlots(medium, [cacheInfoOffset(0), cacheInfoOffset(1)], CACHE_INFO_SIZE, (b) => decodeCacheInfo(b, segNum), (v) => ({
    seq: v.seq,
    segId: v.segId,
    nSegs: v.nSegs,
    flags: v.flags,
    dataCrc: flagsDataCrc(v.flags),
    initDone: flagsInitDone(v.flags),
    cacheMode: CACHE_MODES[flagsModeIndex(v.flags)] ?? `unknown (${flagsModeIndex(v.flags)})`,
    gcPercent: flagsGcPercent(v.flags),
  }));
  dump.cacheInfo = info.view;
  if (!info.value) dump.errors.push('cache_info: no valid slot');
  const nSegs = info.value ? info.value.nSegs : segNum;

  const posView = (v: { seq: number; seg: number; off: number }): PositionView => ({ seq: v.seq, seg: v.seg, off: v.off });
  const kt = await twoSlots(medium, [keyTailOffset(0), keyTailOffset(1)], POS_SIZE, (b) => decodePosition(b, nSegs, 'key_tail'), posView);
  const dt = await twoSlots(medium, [dirtyTailOffset(0), dirtyTailOffset(1)], POS_SIZE, (b) => decodePosition(b, nSegs, 'dirty_tail'), posView);
  dump.keyTail = kt.view;
  dump.dirtyTail = dt.view;
  if (!kt.value) dump.errors.push('key_tail: no valid slot');
  if (!dt.value) dump.errors.push('dirty_tail: no valid slot');
  if (!info.value) return;

  const physOf: number[] = [];
  const gens: number[] = [];
  const seen = new Set<number>();
  let phys = info.value.segId;
  for (let i = 0; i < nSegs; i++) {
    if (seen.has(phys)) {
      dump.errors.push(`segment chain: cycle at cache segment ${i} (physical ${phys} already in the chain)`);
      break;
    }
    seen.add(phys);
    const what = `segment_info of physical segment ${phys}`;
    const si = await twoSlots(medium, [segInfoOffset(phys, 0), segInfoOffset(phys, 1)], SEG_INFO_SIZE, (b) => decodeSegmentInfo(b, segNum, what), (v) => ({
      seq: v.seq,
      flags: v.flags,
      hasNext: segInfoHasNext(v),
      type: segInfoType(v),
      nextSeg: v.nextSeg,
    }));
    const g = await twoSlots(medium, [genOffset(phys, 0), genOffset(phys, 1)], GEN_SIZE, (b) => decodeGen(b), (v) => ({ seq: v.seq, gen: v.gen }));
    const gen = g.value ? g.value.gen : 0;
    dump.segments.push({ cacheSeg: i, phys, info: si.view, gen, gens: g.view });
    physOf.push(phys);
    gens.push(gen);
    if (i + 1 === nSegs) break;
    if (!si.value) {
      dump.errors.push(`segment chain: ${what}: no valid slot`);
      break;
    }
    if (!segInfoHasNext(si.value)) {
      dump.errors.push(`segment chain: ends after ${i + 1} of ${nSegs} segments`);
      break;
    }
    phys = si.value.nextSeg;
  }
  if (physOf.length < nSegs || !kt.value) return;

  const dirtyTail = dt.value;
  let dirtyMet = false;
  const s = dump.summary;
  const ksets: KsetView[] = [];
  const end = await walkLog(medium, physOf, kt.value, async (pos, kset) => {
    const deviceOffset = dataOffset(physOf[pos.seg]!, pos.off);
    // The decoded kset has been checked against its crc but does not carry it; show it anyway.
    const crc = (await readAt(medium, deviceOffset, 4)).readUInt32LE(0);
    if (dirtyTail && samePosition(pos, dirtyTail)) dirtyMet = true;
    s.ksets++;
    s.logBytes += kset.size;
    if (kset.last) {
      s.lastKsets++;
      ksets.push({ pos, deviceOffset, size: kset.size, last: true, crc, nextSeg: kset.nextSeg });
      return;
    }
    const keys = kset.keys.map((k): KeyView => {
      const stale = k.seg >= gens.length || k.gen < gens[k.seg]!;
      const clean = (k.flags & KEY_FLAG_CLEAN) !== 0;
      s.keys++;
      if (stale) s.staleKeys++;
      else if (clean) s.cleanKeys++;
      else if (dirtyMet) {
        s.dirtyKeys++;
        s.dirtyBytes += k.len;
      }
      return { off: k.off, len: k.len, flags: k.flags, clean, seg: k.seg, segOff: k.segOff, gen: k.gen, dataCrc: k.dataCrc, stale };
    });
    ksets.push({ pos, deviceOffset, size: kset.size, last: false, crc, keyNum: keys.length, keys });
  });
  dump.log = {
    from: { seg: kt.value.seg, off: kt.value.off },
    ksets,
    end: { seg: end.head.seg, off: end.head.off },
    endReason: end.reason.message,
    endNormal: end.reason.problem === 'bad-magic',
    segments: end.segments,
  };
}
