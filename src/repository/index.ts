export { initRepository, openRepository, Repository, type RepositoryOptions, type InitOptions } from './repository.ts';
export type { RestorePointDisk, RestorePointSummary } from './manifest.ts';
export type { BackupWriter, DiskWriter, WriterStats } from './backup-writer.ts';
export type { RestorePointReader } from './restore-point-reader.ts';
export { checkRepository, type CheckReport, type CheckProblem } from './check.ts';
export { applyRetention, forgetRestorePoints, type RetentionPolicy, type RetentionDecision } from './retention.ts';
export { collectGarbage, defaultSafetyWindowMs, type GcOptions, type GcReport } from './gc.ts';
export { addKey, listKeys, removeKey, repositoryInfo, type KeyInfo, type RepositoryInfo } from './key-management.ts';
export { SnapshiftError } from '../core/errors.ts';
