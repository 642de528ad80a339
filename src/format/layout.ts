/** Byte layout of a dm-pcache cache device (spec section 3). */

export const KiB = 1024;
export const MiB = 1024 * KiB;

export const SB_OFF = 4 * KiB;
export const CACHE_INFO_OFF = 8 * KiB;
export const CACHE_INFO_SLOT_STRIDE = 4 * KiB;
export const CACHE_CTRL_OFF = 16 * KiB;
export const KEY_TAIL_OFF = CACHE_CTRL_OFF;
export const DIRTY_TAIL_OFF = CACHE_CTRL_OFF + 32;
export const POS_SLOT_STRIDE = 16;
export const SEGMENTS_OFF = 20 * KiB;

export const SEG_SIZE = 16 * MiB;
export const SEG_INFO_SLOT_STRIDE = 4 * KiB;
export const SEG_GEN_OFF = 8 * KiB;
export const SEG_GEN_SLOT_STRIDE = 16;
export const SEG_DATA_OFF = 12 * KiB;
export const SEG_DATA_SIZE = SEG_SIZE - SEG_DATA_OFF;

export const MIN_CACHE_DEV_SIZE = 512 * MiB;
export const MAX_SEGMENTS = 1024 * 1024;

export const SB_MAGIC = 0x65b05efa96c596efn;
export const KSET_MAGIC = 0x676894a64e164f1an;

export const META_HEADER_SIZE = 8;
export const SB_SIZE = 24;
export const CACHE_INFO_SIZE = 24;
export const POS_SIZE = 16;
export const SEG_INFO_SIZE = 16;
export const GEN_SIZE = 16;
export const KEY_SIZE = 40;
export const KSET_HEADER_SIZE = 24;
export const KSET_KEYS_MAX = 128;
export const KSET_MAX_SIZE = KSET_HEADER_SIZE + KEY_SIZE * KSET_KEYS_MAX;

/** Keys never cross a 4 MiB boundary of the backing address space (one index subtree each). */
export const SUBTREE_SIZE = 4 * MiB;

export function segmentsFor(deviceSize: number): number {
  return Math.floor((deviceSize - SEGMENTS_OFF) / SEG_SIZE);
}

/** Byte offset of physical segment `phys` on the device. */
export function segmentOffset(phys: number): number {
  return SEGMENTS_OFF + phys * SEG_SIZE;
}

export function segInfoOffset(phys: number, slot: number): number {
  return segmentOffset(phys) + slot * SEG_INFO_SLOT_STRIDE;
}

export function genOffset(phys: number, slot: number): number {
  return segmentOffset(phys) + SEG_GEN_OFF + slot * SEG_GEN_SLOT_STRIDE;
}

/** Byte offset of `segOff` inside the data area of physical segment `phys`. */
export function dataOffset(phys: number, segOff: number): number {
  return segmentOffset(phys) + SEG_DATA_OFF + segOff;
}

export function cacheInfoOffset(slot: number): number {
  return CACHE_INFO_OFF + slot * CACHE_INFO_SLOT_STRIDE;
}

export function keyTailOffset(slot: number): number {
  return KEY_TAIL_OFF + slot * POS_SLOT_STRIDE;
}

export function dirtyTailOffset(slot: number): number {
  return DIRTY_TAIL_OFF + slot * POS_SLOT_STRIDE;
}
