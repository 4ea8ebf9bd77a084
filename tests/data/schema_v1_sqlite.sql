-- The trace store's schema at version 1 (sqlite), as store/models.py created it
-- before the sweeps migration; tests/test_sweep_store.py migrates a database made from it.

CREATE TABLE kvlab_schema (
	id INTEGER NOT NULL, 
	version INTEGER NOT NULL, 
	PRIMARY KEY (id)
);

CREATE TABLE runs (
	id INTEGER NOT NULL, 
	name VARCHAR(200), 
	tags JSON NOT NULL, 
	config_json TEXT NOT NULL, 
	status VARCHAR(16) NOT NULL, 
	device VARCHAR(100), 
	model VARCHAR(100), 
	created_at DATETIME NOT NULL, 
	finished_at DATETIME, 
	heartbeat_at DATETIME, 
	num_steps INTEGER NOT NULL, 
	error TEXT, 
	writer_pid INTEGER, 
	writer_host VARCHAR(255), 
	writer_started FLOAT, 
	summary JSON, 
	elapsed_s FLOAT, 
	output_tokens_per_s FLOAT, 
	prefix_hit_rate FLOAT, 
	peak_blocks_used INTEGER, 
	num_preemptions INTEGER, 
	num_evictions INTEGER, 
	PRIMARY KEY (id)
);

CREATE INDEX ix_runs_created_at ON runs (created_at);

CREATE INDEX ix_runs_model ON runs (model);

CREATE INDEX ix_runs_status ON runs (status);

CREATE TABLE block_events (
	run_id INTEGER NOT NULL, 
	step INTEGER NOT NULL, 
	ordinal INTEGER NOT NULL, 
	block_id INTEGER NOT NULL, 
	kind SMALLINT NOT NULL, 
	request_id INTEGER, 
	ref_count INTEGER NOT NULL, 
	block_hash VARCHAR(128), 
	PRIMARY KEY (run_id, step, ordinal), 
	FOREIGN KEY(run_id) REFERENCES runs (id) ON DELETE CASCADE
)
 WITHOUT ROWID;

CREATE TABLE keyframes (
	run_id INTEGER NOT NULL, 
	step INTEGER NOT NULL, 
	num_blocks INTEGER NOT NULL, 
	data BLOB NOT NULL, 
	PRIMARY KEY (run_id, step), 
	FOREIGN KEY(run_id) REFERENCES runs (id) ON DELETE CASCADE
)
 WITHOUT ROWID;

CREATE TABLE request_events (
	run_id INTEGER NOT NULL, 
	step INTEGER NOT NULL, 
	ordinal INTEGER NOT NULL, 
	t FLOAT NOT NULL, 
	request_id INTEGER NOT NULL, 
	kind SMALLINT NOT NULL, 
	PRIMARY KEY (run_id, step, ordinal), 
	FOREIGN KEY(run_id) REFERENCES runs (id) ON DELETE CASCADE
)
 WITHOUT ROWID;

CREATE TABLE requests (
	run_id INTEGER NOT NULL, 
	ordinal INTEGER NOT NULL, 
	request_id INTEGER NOT NULL, 
	arrival_t FLOAT NOT NULL, 
	prompt_tokens INTEGER NOT NULL, 
	cached_prompt_tokens INTEGER NOT NULL, 
	output_tokens INTEGER NOT NULL, 
	first_token_t FLOAT, 
	finish_t FLOAT, 
	num_preemptions INTEGER NOT NULL, 
	finish_reason TEXT NOT NULL, 
	PRIMARY KEY (run_id, ordinal), 
	FOREIGN KEY(run_id) REFERENCES runs (id) ON DELETE CASCADE
)
 WITHOUT ROWID;

CREATE INDEX ix_requests_run_request ON requests (run_id, request_id);

CREATE TABLE steps (
	run_id INTEGER NOT NULL, 
	step INTEGER NOT NULL, 
	t FLOAT NOT NULL, 
	duration_s FLOAT NOT NULL, 
	num_running INTEGER NOT NULL, 
	num_waiting INTEGER NOT NULL, 
	num_prefill_tokens INTEGER NOT NULL, 
	num_decode_tokens INTEGER NOT NULL, 
	num_generated_tokens INTEGER NOT NULL, 
	num_preempted INTEGER NOT NULL, 
	blocks_used INTEGER NOT NULL, 
	blocks_free INTEGER NOT NULL, 
	blocks_cached_free INTEGER NOT NULL, 
	prefix_query_tokens INTEGER NOT NULL, 
	prefix_hit_tokens INTEGER NOT NULL, 
	num_evicted INTEGER NOT NULL, 
	kv_bytes_used BIGINT NOT NULL, 
	kv_bytes_capacity BIGINT NOT NULL, 
	torch_allocated_bytes BIGINT, 
	torch_reserved_bytes BIGINT, 
	nvml_used_bytes BIGINT, 
	gpu_utilization_pct FLOAT, 
	gpu_power_w FLOAT, 
	rss_bytes BIGINT, 
	PRIMARY KEY (run_id, step), 
	FOREIGN KEY(run_id) REFERENCES runs (id) ON DELETE CASCADE
)
 WITHOUT ROWID;

INSERT INTO kvlab_schema (id, version) VALUES (1, 1);
