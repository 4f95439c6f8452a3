// One catalogue of error codes. Every code carries its HTTP status and a one-line meaning;
// docs/errors.md documents each one (a test keeps the two in step).

export const ERROR_CODES = {
  BAD_REQUEST: { status: 400, meaning: 'The request is malformed or missing a required field.' },
  BAD_PEM: { status: 400, meaning: 'The PEM input is malformed, truncated or of the wrong type.' },
  BAD_DER: { status: 400, meaning: 'The DER input is malformed or truncated.' },
  BAD_CSR: { status: 400, meaning: 'The certificate signing request cannot be parsed.' },
  CSR_SIGNATURE_INVALID: { status: 400, meaning: 'The CSR signature does not verify with the key it carries.' },
  UNSUPPORTED_ALGORITHM: { status: 400, meaning: 'The key or signature algorithm is not supported.' },
  INPUT_TOO_LARGE: { status: 413, meaning: 'The input exceeds the size limit for its kind.' },
  UNKNOWN_PROFILE: { status: 400, meaning: 'No certificate profile has that name.' },
  PROFILE_VIOLATION: { status: 400, meaning: 'The request does not satisfy the certificate profile.' },
  CERTIFICATE_CHECK_FAILED: { status: 500, meaning: 'An issued certificate failed its parse-back check against the profile; nothing was returned.' },
  BAD_PASSPHRASE: { status: 401, meaning: 'The passphrase does not open the key store.' },
  PASSPHRASE_REQUIRED: { status: 400, meaning: 'A passphrase is needed and none was given (HALLMARK_PASSPHRASE or --passphrase-file).' },
  KEY_NOT_FOUND: { status: 404, meaning: 'The key reference names no key in the backend.' },
  KEY_BACKEND_FAILED: { status: 500, meaning: 'The key backend (file store or PKCS#11 token) reported an error.' },
  NOT_INITIALISED: { status: 409, meaning: 'The authority home has not been initialised (run hallmark init).' },
  ALREADY_INITIALISED: { status: 409, meaning: 'The authority home or root directory already holds an authority.' },
  CA_NOT_FOUND: { status: 404, meaning: 'No CA has that name.' },
  CA_EXISTS: { status: 409, meaning: 'A CA with that name already exists.' },
  CA_NOT_ACTIVE: { status: 409, meaning: 'The CA is not active (pending, retired, expired or revoked).' },
  CA_CERT_MISMATCH: { status: 400, meaning: 'The certificate does not match the pending request or does not chain to the root.' },
  TLS_RENEWAL_IN_PROGRESS: { status: 409, meaning: 'Another process is renewing the authority\'s HTTPS certificate right now (tls/renew.lock); it is picked up when done. A lock older than 5 minutes is taken over.' },
  ROOT_DIR_INVALID: { status: 400, meaning: 'The directory is not a Hallmark offline root directory.' },
  CERTIFICATE_NOT_FOUND: { status: 404, meaning: 'No certificate has that serial number.' },
  SERIAL_COLLISION: { status: 500, meaning: 'Could not allocate a unique serial number (should never happen).' },
  UNAUTHENTICATED: { status: 401, meaning: 'No valid bearer token was presented.' },
  FORBIDDEN: { status: 403, meaning: 'The token does not carry the scope this operation needs.' },
  BAD_SCOPE: { status: 400, meaning: 'The scope is not one of the known scopes.' },
  BAD_DURATION: { status: 400, meaning: 'The duration is not of the form 90d, 12h, 30m or 2y.' },
  NOT_FOUND: { status: 404, meaning: 'No such resource.' },
  DATABASE_UNAVAILABLE: { status: 503, meaning: 'The database cannot be reached.' },
  ALREADY_EXISTS: { status: 409, meaning: 'A product, line, batch, tenant or vendor with that name already exists.' },
  PRODUCT_NOT_FOUND: { status: 404, meaning: 'No product has that name.' },
  LINE_NOT_FOUND: { status: 404, meaning: 'No production line has that name.' },
  BATCH_NOT_FOUND: { status: 404, meaning: 'No batch has that id.' },
  BATCH_EXPIRED: { status: 409, meaning: 'The batch has expired: its devices can no longer be registered or provisioned.' },
  DEVICE_NOT_FOUND: { status: 404, meaning: 'No device has that UDID.' },
  CLONE_DETECTED: { status: 409, meaning: 'The UDID or public key is already registered to another device (a cloned or re-used chip); the attempt is audited.' },
  QUOTA_EXCEEDED: { status: 409, meaning: 'The batch quota is used up: no further device of it may receive an operational identity (overproduction); the attempt is audited.' },
  ILLEGAL_TRANSITION: { status: 409, meaning: 'The device state does not allow that change (see the device state diagram).' },
  DEVICE_NOT_ELIGIBLE: { status: 403, meaning: 'The device state does not allow issuance (suspended, revoked or decommissioned).' },
  KEY_MISMATCH: { status: 403, meaning: 'The CSR key is not the key registered for the device, or a UDID does not match its key.' },
  BIRTH_CERT_INVALID: { status: 400, meaning: 'The birth certificate does not chain to a trusted vendor CA, is not valid now, or does not carry the registered key.' },
  MANIFEST_INVALID: { status: 400, meaning: 'The manifest or one of its entries is malformed or wrongly signed; the message names the entry.' },
  EST_CREDENTIALS_REQUIRED: { status: 401, meaning: 'The EST request carries no credential this server accepts: a client certificate, a claim (HTTP Basic), or a CSR signed by a registered hardware key.' },
  CLAIM_INVALID: { status: 401, meaning: 'The claim is unknown, its secret is wrong, or it has expired, been revoked or been used up; the attempt is audited.' },
  CLAIM_ALREADY_USED: { status: 403, meaning: 'This device has already enrolled with this claim (a claim lets each device enrol once; renew with the current certificate).' },
  ENROLMENT_REFUSED: { status: 403, meaning: 'No enrolment authenticator accepted the request (unknown key, untrusted or revoked certificate, wrong label); the reason is audited.' },
  CHANNEL_BINDING_MISMATCH: { status: 403, meaning: 'The CSR challengePassword does not carry this TLS session\'s channel binding (tls-unique or tls-exporter): the CSR was made for another connection.' },
  SERVER_KEYGEN_NOT_ALLOWED: { status: 403, meaning: 'The product does not allow server-side key generation.' },
  ENROLMENT_PENDING: { status: 202, meaning: 'The enrolment waits for an operator\'s approval (batch created with --require-approval); ask again after Retry-After.' },
  ENROLMENT_REJECTED: { status: 403, meaning: 'An operator rejected this device\'s enrolment request.' },
  RENEWAL_NOT_DUE: { status: 403, meaning: 'The current certificate is not yet in its renewal window (the product renews after a share of the lifetime); Retry-After says when.' },
  UNSUPPORTED_MEDIA_TYPE: { status: 415, meaning: 'The request body has the wrong Content-Type (EST wants application/pkcs10).' },
  RATE_LIMITED: { status: 429, meaning: 'Too many requests from this client or with this claim; retry after the time given.' },
  AUDIT_CHAIN_BROKEN: { status: 500, meaning: 'The audit log hash chain does not verify.' },
  STAMP_RUN_UNFINISHED: { status: 409, meaning: 'The batch has an unfinished stamp run with other settings; run that command again to finish it first.' },
  STAMP_RUN_BUSY: { status: 409, meaning: "Another process is making this batch's stamp run; wait for it (or stop it) and run the command again." },
  STAMP_INVALID: { status: 400, meaning: 'The stamp file (json, tlv or nvs) is malformed, truncated, over its size limit or fails a check; the message names the field or record.' },
  STAMP_ARCHIVE_INVALID: { status: 400, meaning: 'The stamp archive is not an archive, is truncated, or was changed after signing; the message names what is wrong.' },
  STAMP_ARCHIVE_WRONG_KEY: { status: 400, meaning: 'The stamp archive is encrypted to another factory key (the message names the key it was made for), or the key given is not a P-256 factory key.' },
  STAMP_ARCHIVE_UNTRUSTED: { status: 400, meaning: 'The stamp archive signer does not chain to a trusted root, is not a CA, or is not valid now.' },
  STAMP_WRITE_FAILED: { status: 500, meaning: 'A stamp file could not be written (disk full, permissions); the message names the file and the system error. The committed stamps stay pending: run the same command again once fixed.' },
  STATION_PACKAGE_INVALID: { status: 400, meaning: 'The station package (station.json, station.pem, chain.pem) is malformed, incomplete, expired or does not chain to its root; the message names the field or file.' },
  STATION_KEY_MISMATCH: { status: 400, meaning: 'The key in the PKCS#11 token is not the key of the station certificate (station.pem).' },
  STATION_NOT_INITIALISED: { status: 409, meaning: 'The directory holds no factory station (run hallmark station init).' },
  STATION_ALREADY_INITIALISED: { status: 409, meaning: 'The directory already holds a factory station.' },
  STATION_BUSY: { status: 409, meaning: 'Another station command is running on this station directory.' },
  STATION_EXPIRED: { status: 409, meaning: 'The station package is past its validity (validUntil or the station certificate\'s notAfter): the station signs nothing more.' },
  STATION_QUOTA_EXHAUSTED: { status: 409, meaning: 'The station has signed as many devices as its quota allows; nothing more is signed.' },
  STATION_DEVICE_UNKNOWN: { status: 403, meaning: 'The CSR key is not one of the device keys registered for the station\'s batch.' },
  STATION_DUPLICATE: { status: 409, meaning: 'The station has already signed a certificate for this device key (or UDID); it is not signed twice.' },
  JOURNAL_INVALID: { status: 400, meaning: 'The station journal cannot be read (missing, unreadable, over the size limit, or not a station journal).' },
  STATION_NOT_FOUND: { status: 404, meaning: 'No factory station has that id (hallmark station list shows them).' },
  STATION_MISMATCH: { status: 409, meaning: 'The station package, certificate or journal belongs to another station, line or batch, or no longer matches what station create recorded; the message names what differs.' },
  INTERNAL: { status: 500, meaning: 'An unexpected internal error.' },
} as const satisfies Record<string, { status: number; meaning: string }>;

export type ErrorCode = keyof typeof ERROR_CODES;

export class HallmarkError extends Error {
  readonly code: ErrorCode;
  readonly status: number;
  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'HallmarkError';
    this.code = code;
    this.status = ERROR_CODES[code].status;
  }
}

export function isHallmarkError(err: unknown): err is HallmarkError {
  return err instanceof HallmarkError;
}

/** Maps any thrown value to a HallmarkError without leaking internals in the message. */
export function toHallmarkError(err: unknown): HallmarkError {
  if (err instanceof HallmarkError) return err;
  const e = err as { code?: string; message?: string } | undefined;
  if (e && typeof e.code === 'string' && ['ECONNREFUSED', 'ENOTFOUND', 'EHOSTUNREACH', 'ETIMEDOUT', '57P01', '3D000', '28P01'].includes(e.code)) {
    return new HallmarkError('DATABASE_UNAVAILABLE', `database unavailable: ${e.message ?? e.code}`, { cause: err });
  }
  return new HallmarkError('INTERNAL', 'internal error', { cause: err });
}
