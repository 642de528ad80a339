import {
  CACHE_INFO_SIZE,
  cacheInfoOffset,
  decodeCacheInfo,
  decodeGen,
  decodePosition,
  decodeSegmentInfo,
  decodeSuperblock,
  dirtyTailOffset,
  FormatError,
  GEN_SIZE,
  genOffset,
  keyTailOffset,
  pickSlot,
  POS_SIZE,
  SB_OFF,
  SB_SIZE,
  SEG_INFO_SIZE,
  segInfoHasNext,
  segInfoOffset,
  superblockBlank,
  type CacheInfo,
  type Decoded,
  type PositionRecord,
  type SegmentInfo,
  type Superblock,
} from '../format/index.js';
import type { Medium } from '../media/medium.js';

/** Where the newest copy of a two-slot record lives, so that the next update goes to the other. */
export interface SlotState {
  slot: 0 | 1;
  seq: number;
}

/** Everything persisted outside the log, as loaded from a cache device. */
export interface CacheMeta {
  deviceSize: number;
  sb: Superblock;
  cacheInfo: CacheInfo;
  cacheInfoSlot: SlotState;
  /** Physical segment of each cache segment, following the chain from cache_info.seg_id. */
  physOf: number[];
  /** Newest segment_info slot of each cache segment (by cache segment id). */
  segInfoSlots: SlotState[];
  gens: number[];
  /** Newest generation slot of each cache segment; seq -1 slot 0 when none was ever valid. */
  genSlots: SlotState[];
  keyTail: PositionRecord;
  keyTailSlot: SlotState;
  dirtyTail: PositionRecord;
  dirtyTailSlot: SlotState;
  /** Slots that hold bytes but no valid record: harmless after a torn update, worth reporting. */
  warnings: string[];
}

async function readAt(medium: Medium, offset: number, length: number): Promise<Buffer> {
  const buf = Buffer.allocUnsafe(length);
  await medium.read(buf, offset);
  return buf;
}

function allZero(buf: Buffer): boolean {
  for (let i = 0; i < buf.length; i++) if (buf[i] !== 0) return false;
  return true;
}

async function loadSlots<T extends { seq: number }>(
  medium: Medium,
  offsets: [number, number],
  size: number,
  decode: (b: Buffer) => Decoded<T>,
  what: string,
  warnings: string[],
): Promise<{ value: T; state: SlotState } | FormatError> {
  const raw = await Promise.all(offsets.map((o) => readAt(medium, o, size)));
  const decoded = raw.map(decode) as [Decoded<T>, Decoded<T>];
  decoded.forEach((d, i) => {
    if (d instanceof FormatError && !allZero(raw[i]!)) warnings.push(`${what} slot ${i}: ${d.message}`);
  });
  const pick = pickSlot(decoded[0], decoded[1]);
  if (!pick) {
    const why = decoded.map((d, i) => `slot ${i}: ${d instanceof FormatError ? d.message : 'ok'}`).join('; ');
    return new FormatError('bad-crc', `${what}: no valid slot (${why})`);
  }
  return { value: pick.value, state: { slot: pick.slot, seq: pick.value.seq } };
}

/** Is the device unformatted (superblock magic 0)? */
export async function isBlank(medium: Medium): Promise<boolean> {
  if (medium.size() < SB_OFF + SB_SIZE) return true;
  return superblockBlank(await readAt(medium, SB_OFF, SB_SIZE));
}

/**
 * Load and validate every persisted record outside the log (spec sections 3 and 5). Returns the
 * first problem that makes the cache unusable; problems that a torn update explains are warnings.
 */
export async function loadMeta(medium: Medium): Promise<CacheMeta | FormatError> {
  const deviceSize = medium.size();
  if (deviceSize < SB_OFF + SB_SIZE) return new FormatError('device-too-small', 'cache device is too small to hold a superblock');
  const sb = decodeSuperblock(await readAt(medium, SB_OFF, SB_SIZE), deviceSize);
  if (sb instanceof FormatError) return sb;
  const warnings: string[] = [];
  const info = await loadSlots(medium, [cacheInfoOffset(0), cacheInfoOffset(1)], CACHE_INFO_SIZE, (b) => decodeCacheInfo(b, sb.segNum), 'cache_info', warnings);
  if (info instanceof FormatError) return info;
  const nSegs = info.value.nSegs;

  const physOf: number[] = [];
  const segInfoSlots: SlotState[] = [];
  const seen = new Set<number>();
  let phys = info.value.segId;
  for (let i = 0; i < nSegs; i++) {
    if (seen.has(phys)) return new FormatError('bad-chain', `segment chain: cycle at cache segment ${i} (physical ${phys} already in the chain)`);
    seen.add(phys);
    physOf.push(phys);
    const si = await loadSlots<SegmentInfo>(
      medium,
      [segInfoOffset(phys, 0), segInfoOffset(phys, 1)],
      SEG_INFO_SIZE,
      (b) => decodeSegmentInfo(b, sb.segNum, `segment_info of physical segment ${phys}`),
      `segment_info of physical segment ${phys}`,
      warnings,
    );
    if (si instanceof FormatError) return new FormatError('bad-chain', `segment chain: ${si.message}`);
    segInfoSlots.push(si.state);
    if (i + 1 < nSegs) {
      if (!segInfoHasNext(si.value)) return new FormatError('bad-chain', `segment chain: ends after ${i + 1} of ${nSegs} segments`);
      phys = si.value.nextSeg;
    }
  }

  const gens: number[] = [];
  const genSlots: SlotState[] = [];
  for (let i = 0; i < nSegs; i++) {
    const p = physOf[i]!;
    const raw = await Promise.all([readAt(medium, genOffset(p, 0), GEN_SIZE), readAt(medium, genOffset(p, 1), GEN_SIZE)]);
    const d = raw.map((b) => decodeGen(b, `generation of cache segment ${i}`));
    d.forEach((r, s) => {
      if (r instanceof FormatError && !allZero(raw[s]!)) warnings.push(`generation of cache segment ${i} slot ${s}: ${r.message}`);
    });
    const pick = pickSlot(d[0]!, d[1]!);
    // No valid record means generation 0; the next update then goes to slot 1, as on a fresh device.
    gens.push(pick ? pick.value.gen : 0);
    genSlots.push(pick ? { slot: pick.slot, seq: pick.value.seq } : { slot: 0, seq: 0 });
  }

  const kt = await loadSlots(medium, [keyTailOffset(0), keyTailOffset(1)], POS_SIZE, (b) => decodePosition(b, nSegs, 'key_tail'), 'key_tail', warnings);
  if (kt instanceof FormatError) return kt;
  const dt = await loadSlots(medium, [dirtyTailOffset(0), dirtyTailOffset(1)], POS_SIZE, (b) => decodePosition(b, nSegs, 'dirty_tail'), 'dirty_tail', warnings);
  if (dt instanceof FormatError) return dt;

  return {
    deviceSize,
    sb,
    cacheInfo: info.value,
    cacheInfoSlot: info.state,
    physOf,
    segInfoSlots,
    gens,
    genSlots,
    keyTail: kt.value,
    keyTailSlot: kt.state,
    dirtyTail: dt.value,
    dirtyTailSlot: dt.state,
    warnings,
  };
}
