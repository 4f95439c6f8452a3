// Structured JSON logs (pino). Anything that could carry a secret is redacted by path, and the code
// never logs keys, passphrases or tokens in the first place.

import { pino, type Logger } from 'pino';

export const REDACT_PATHS = [
  'req.headers.authorization', 'req.headers.cookie', 'headers.authorization', 'authorization',
  'passphrase', 'pin', 'token', 'secret', '*.passphrase', '*.pin', '*.token', '*.secret', 'privateKey', '*.privateKey',
];

export function createLogger(destination?: NodeJS.WritableStream): Logger {
  return pino({ level: process.env.HALLMARK_LOG_LEVEL ?? 'info', redact: { paths: REDACT_PATHS, censor: '[redacted]' }, base: { service: 'hallmark' } }, (destination ?? process.stderr) as pino.DestinationStream);
}
