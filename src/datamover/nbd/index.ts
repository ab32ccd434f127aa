export { NbdClient, type NbdConnectOptions, type Extent } from './nbd-client.ts';
export { allocationFlag, dirtyFlag, transmissionFlag } from './nbd-protocol.ts';
