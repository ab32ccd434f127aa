export { NbdClient, type NbdConnectOptions, type ReadOptions, type Extent } from './nbd-client.ts';
export { allocationFlag, dirtyFlag, transmissionFlag } from './nbd-protocol.ts';
export { NbdServer, type NbdServerOptions, type NbdServerStats } from './nbd-server.ts';
export type { NbdExportSource, ExportPiece, ExportExtent } from './nbd-export-source.ts';
