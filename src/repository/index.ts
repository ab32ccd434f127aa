export { initRepository, openRepository, Repository, type RepositoryOptions, type InitOptions } from './repository.ts';
export type { RestorePointDisk, RestorePointSummary } from './manifest.ts';
export type { BackupWriter, DiskWriter, WriterStats } from './backup-writer.ts';
export type { RestorePointReader } from './restore-point-reader.ts';
