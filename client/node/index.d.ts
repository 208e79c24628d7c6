// Type declarations for normd's Node.js client (index.js). Messages use the proto's field names
// (proto/normd/v1/normd.proto); 64-bit integers arrive as numbers.

/** Row-major float32 tensor; the first dimension is the batch. */
export interface Tensor {
  data: Float32Array;
  shape: number[];
}
/** What a method accepts as a tensor: { data, shape } or a nested number array. */
export type TensorLike = Tensor | { data: Float32Array | number[]; shape: number[] } | number[] | number[][] | number[][][] | number[][][][];

/** The wire form of a tensor. */
export interface WireTensor {
  shape: number[];
  values?: number[];
  raw?: Uint8Array;
}

export type Loss = 'LOSS_UNSPECIFIED' | 'LOSS_CROSS_ENTROPY' | 'LOSS_MSE' | 'LOSS_BCE_WITH_LOGITS';
export type Mode = 'MODE_UNSPECIFIED' | 'MODE_TRAIN' | 'MODE_EVAL';

export interface LinearSpec { in_features: number; out_features: number; bias?: boolean }
export interface BatchNormSpec {
  num_features: number; eps?: number; momentum?: number; cumulative_average?: boolean;
  affine?: boolean; track_running_stats?: boolean;
}
export interface LayerNormSpec { normalized_shape: number[]; eps?: number; elementwise_affine?: boolean }
export interface Conv2dSpec {
  in_channels: number; out_channels: number; kernel_size: number; stride?: number; padding?: number; bias?: boolean;
}
export interface Pool2dSpec { kernel_size: number; stride?: number; padding?: number }
export interface GroupNormSpec { num_groups: number; num_channels: number; eps?: number; affine?: boolean }
export interface InstanceNormSpec {
  num_features: number; eps?: number; momentum?: number; affine?: boolean; track_running_stats?: boolean;
}
type Empty = Record<string, never>;

/** One layer: a name (optional) and exactly one kind field. */
export interface LayerSpec {
  name?: string;
  linear?: LinearSpec;
  batch_norm1d?: BatchNormSpec;
  batch_norm2d?: BatchNormSpec;
  layer_norm?: LayerNormSpec;
  conv2d?: Conv2dSpec;
  max_pool2d?: Pool2dSpec;
  avg_pool2d?: Pool2dSpec;
  flatten?: Empty;
  relu?: Empty;
  leaky_relu?: { negative_slope?: number };
  tanh?: Empty;
  sigmoid?: Empty;
  gelu?: Empty;
  dropout?: { p: number };
  group_norm?: GroupNormSpec;
  instance_norm1d?: InstanceNormSpec;
  instance_norm2d?: InstanceNormSpec;
  /** Set on answers: which kind field is filled. */
  kind?: string;
}

export interface SGDSpec { lr: number; momentum?: number; dampening?: number; nesterov?: boolean; weight_decay?: number }
export interface AdamSpec {
  lr: number; beta1?: number; beta2?: number; eps?: number; weight_decay?: number; decoupled_weight_decay?: boolean;
}
export interface OptimizerSpec { sgd?: SGDSpec; adam?: AdamSpec; kind?: string }

export interface ModelSpec {
  input_shape: number[];
  layers: LayerSpec[];
  loss: Loss;
  optimizer: OptimizerSpec;
  seed?: number;
}

export interface BatchNormStatus {
  layer: string;
  num_batches_tracked: number;
  last_mean_shift: number;
  last_var_log_ratio: number;
  running_mean_update_norm: number;
  running_var_update_norm: number;
}
export interface LayerOptions { layer: string; frozen?: boolean; trainable?: boolean }

export interface Model {
  id: string;
  /** The tenant that owns the model ("default" on a server without tenants). */
  tenant: string;
  spec: ModelSpec;
  mode: Mode;
  step: number;
  parameter_count: number;
  output_shape: number[];
  running_stats_frozen: boolean;
  batch_norms: BatchNormStatus[];
  layer_options: LayerOptions[];
  inference_only: boolean;
}

export interface LayerStats {
  index: number; name: string; kind: string;
  input_mean: number; input_std: number; output_mean: number; output_std: number;
}
export interface SmallBatchWarning { layer: string; values_per_channel: number; message: string }

export interface ForwardResult {
  output: Tensor;
  forwardId: number;
  layerStats: LayerStats[];
  warnings: SmallBatchWarning[];
}
export interface TrainStepResponse { loss: number; step: number; samples: number; warnings: SmallBatchWarning[] }
export interface EvaluateResponse { loss: number; accuracy: number; samples: number }

/** Exactly one of labels (class indices, cross-entropy) and target (a tensor). */
export interface Supervision { labels?: ArrayLike<number>; target?: TensorLike }
export type Batch = Supervision & { x: TensorLike };

export interface FoldResult { spec: ModelSpec; state: Map<string, Tensor>; model: Model | null }

export type Pem = Uint8Array | string;
export interface ClientOptions {
  /** Deadline of each unary call in ms (30000; 0 or null: none). */
  timeoutMs?: number | null;
  /** Deadline of a stream in ms (none). */
  streamTimeoutMs?: number | null;
  /** Bearer token sent as "authorization: Bearer <token>". */
  token?: string;
  /** TLS with the system roots (implied by ca, cert or key). */
  tls?: boolean;
  /** PEM CA bundle to check the server with: Buffer, PEM text or a file path. */
  ca?: Pem;
  /** Client certificate chain and key for mutual TLS (both or neither). */
  cert?: Pem;
  key?: Pem;
  /** Check the server certificate against this name instead of the address's host. */
  serverName?: string;
  /** Passed to grpc-js as channel options. */
  channelOptions?: Record<string, string | number>;
}

export type StatusName =
  | 'OK' | 'CANCELLED' | 'UNKNOWN' | 'INVALID_ARGUMENT' | 'DEADLINE_EXCEEDED' | 'NOT_FOUND'
  | 'ALREADY_EXISTS' | 'PERMISSION_DENIED' | 'RESOURCE_EXHAUSTED' | 'FAILED_PRECONDITION' | 'ABORTED'
  | 'OUT_OF_RANGE' | 'UNIMPLEMENTED' | 'INTERNAL' | 'UNAVAILABLE' | 'DATA_LOSS' | 'UNAUTHENTICATED';

export class NormdError extends Error {
  /** The gRPC status name. */
  readonly code: StatusName;
  /** The server's message. */
  readonly details: string;
  /** The RPC that failed, e.g. "TrainStep". */
  readonly method: string;
}

export class Client {
  constructor(address?: string, options?: ClientOptions);
  readonly address: string;
  timeoutMs: number | null;
  streamTimeoutMs: number | null;
  close(): void;

  createModel(spec: ModelSpec, id?: string): Promise<Model>;
  getModel(model: string): Promise<Model>;
  listModels(): Promise<Model[]>;
  deleteModel(model: string): Promise<void>;
  setMode(model: string, mode: 'train' | 'eval' | Mode, options?: { freezeRunningStats?: boolean }): Promise<Model>;
  resetRunningStats(model: string): Promise<Model>;
  updateOptimizer(model: string, optimizer: OptimizerSpec): Promise<Model>;
  /** Resolves to the step the durable checkpoint holds. */
  saveModel(model: string): Promise<number>;

  forward(model: string, x: TensorLike, options?: { retainForBackward?: boolean; layerStats?: boolean }): Promise<ForwardResult>;
  backward(model: string, forwardId: number, gradOutput: TensorLike, options?: { returnGradInput?: boolean }): Promise<Tensor | null>;
  applyGradients(model: string): Promise<number>;
  trainStep(model: string, x: TensorLike, supervision: Supervision): Promise<TrainStepResponse>;
  trainStream(model: string, batches: Iterable<Batch> | AsyncIterable<Batch>): AsyncGenerator<TrainStepResponse, void, undefined>;
  evaluate(model: string, x: TensorLike, supervision: Supervision): Promise<EvaluateResponse>;

  getState(model: string, options?: { includeOptimizer?: boolean }): Promise<Map<string, Tensor>>;
  setState(model: string, state: Map<string, TensorLike> | Record<string, TensorLike>, options?: { strict?: boolean }): Promise<Model>;

  adaptStatistics(model: string, batches: Iterable<TensorLike> | AsyncIterable<TensorLike>): Promise<Model>;
  setLayerOptions(model: string, layers: LayerOptions[]): Promise<Model>;
  foldBatchNorm(model: string, options?: { newModel?: string }): Promise<FoldResult>;

  health(service?: string): Promise<'UNKNOWN' | 'SERVING' | 'NOT_SERVING' | 'SERVICE_UNKNOWN'>;
}

export function toTensor(x: TensorLike): WireTensor;
export function fromTensor(t: WireTensor): Tensor;
export const NORMD_PROTO: string;
export const HEALTH_PROTO: string;
