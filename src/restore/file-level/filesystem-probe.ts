import type { ReadDiskBytes } from './disk-bytes.ts';

/** Filesystems `files` can mount: what the kernel calls them, and how we show them. */
export type MountableKind = 'ext2' | 'ext3' | 'ext4' | 'xfs' | 'btrfs';

export type FilesystemProbe =
  | { kind: MountableKind; label: string; uuid: string }
  /** Something we recognise but cannot restore files from (swap, LVM, FAT, NTFS), or nothing we know. */
  | { kind: 'unsupported'; what: string };

/**
 * What filesystem starts at `offsetBytes`, read from its superblock:
 * ext2/3/4 (superblock at 1024, s_magic 0xEF53 at 56, s_uuid at 104, s_volume_name at 120; a journal makes it
 * ext3, extents or 64bit ext4), XFS (superblock at 0, "XFSB", sb_uuid at 32, sb_fname at 108), btrfs (superblock
 * at 64 KiB, "_BHRfS_M" at 64, fsid at 32, label at 0x12B). The rest is named only to say why it is refused.
 */
export async function probeFilesystem(read: ReadDiskBytes, offsetBytes: number, sizeBytes: number): Promise<FilesystemProbe> {
  const head = await read(offsetBytes, Math.min(sizeBytes, 8192));
  if (head.length >= 2048 && head.readUInt16LE(1024 + 56) === 0xef53) {
    const superblock = head.subarray(1024, 2048);
    const compat = superblock.readUInt32LE(92);
    const incompat = superblock.readUInt32LE(96);
    const extentsOr64bit = (incompat & 0x40) !== 0 || (incompat & 0x80) !== 0 || (incompat & 0x200) !== 0;
    const kind: MountableKind = extentsOr64bit ? 'ext4' : (compat & 0x4) !== 0 ? 'ext3' : 'ext2';
    return { kind, uuid: uuidText(superblock.subarray(104, 120)), label: cString(superblock.subarray(120, 136)) };
  }
  if (head.toString('latin1', 0, 4) === 'XFSB') {
    return { kind: 'xfs', uuid: uuidText(head.subarray(32, 48)), label: cString(head.subarray(108, 120)) };
  }
  if (sizeBytes >= 0x10000 + 4096) {
    const btrfs = await read(offsetBytes + 0x10000, 4096);
    if (btrfs.toString('latin1', 64, 72) === '_BHRfS_M') return { kind: 'btrfs', uuid: uuidText(btrfs.subarray(32, 48)), label: cString(btrfs.subarray(0x12b, 0x12b + 256)) };
  }
  return { kind: 'unsupported', what: otherSignature(head) };
}

function otherSignature(head: Buffer): string {
  if (head.length >= 4096 && head.toString('latin1', 4086, 4096) === 'SWAPSPACE2') return 'Linux swap';
  for (const sector of [0, 1, 2, 3]) {
    if (head.toString('latin1', sector * 512, sector * 512 + 8) === 'LABELONE' && head.toString('latin1', sector * 512 + 24, sector * 512 + 32) === 'LVM2 001') {
      return 'an LVM physical volume (LVM is not supported)';
    }
  }
  if (head.toString('latin1', 3, 11) === 'NTFS    ') return 'NTFS';
  if (head.toString('latin1', 82, 87) === 'FAT32' || head.toString('latin1', 54, 59) === 'FAT16' || head.toString('latin1', 54, 59) === 'FAT12') return 'FAT';
  if (head.toString('latin1', 0, 4) === 'LUKS') return 'LUKS (encrypted)';
  return head.every((byte) => byte === 0) ? 'nothing (its first 8 KiB are zeros)' : 'no filesystem snapshift knows';
}

function uuidText(bytes: Buffer): string {
  const hex = bytes.toString('hex');
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

function cString(bytes: Buffer): string {
  const end = bytes.indexOf(0);
  return bytes.subarray(0, end < 0 ? bytes.length : end).toString('utf8');
}
