// ESM entry point: the same objects as the CommonJS module.
import normd from './index.js';

export const { Client, NormdError, toTensor, fromTensor, NORMD_PROTO, HEALTH_PROTO } = normd;
export default normd;
