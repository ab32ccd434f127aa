export { NbdClient, type NbdConnectOptions, type ReadOptions, type Extent } from './nbd-client.ts';
export { allocationFlag, dirtyFlag, transmissionFlag } from './nbd-protocol.ts';
