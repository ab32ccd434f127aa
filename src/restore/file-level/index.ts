export { FileRestoreSession, type FileRestoreSessionOptions } from './mount-session.ts';
export { findVolumes, parseGuestPath, partitionVolumeName, type Volume, type GuestPath } from './volumes.ts';
export { readPartitionTable, type Partition, type PartitionTable } from './partition-table.ts';
export { probeFilesystem, type FilesystemProbe, type MountableKind } from './filesystem-probe.ts';
export { resolveInsideGuest } from './guest-path.ts';
export { listEntries, modeString, type FileEntry, type EntryType } from './file-listing.ts';
export { copyOut, type CopySummary } from './file-copy.ts';
export { removeFileRestoreLeftovers, describeTearDown } from './leftovers.ts';
export type { TearDownReport } from './tear-down.ts';
