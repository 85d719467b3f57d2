"""The job message: native version 1, the AWS guidance's formats, SNS envelopes, and errors."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sdworker.errors import InvalidJob
from sdworker.jobs import Job, JobSpec, message_format, parse_message

NATIVE_EXAMPLE: dict[str, Any] = {
    "version": 1,
    "id": "fox-0001",
    "task": "txt2img",
    "backend": "diffusers",
    "params": {
        "prompt": "a red fox in snow",
        "negative_prompt": "",
        "width": 512,
        "height": 512,
        "steps": 20,
        "guidance_scale": 7.0,
        "sampler": "euler_a",
        "seed": 42,
        "batch_size": 1,
        "model": "sd15",
        "strength": 0.75,
    },
    "inputs": {"image": "s3://bucket/in/fox.png", "mask": None},
    "workflow": None,
    "native": None,
    "output": {"bucket": "my-bucket", "prefix": "results", "format": "png"},
    "notify": {"topic_arn": "arn:aws:sns:us-east-1:123456789012:sd-results"},
    "context": {"user": "u-17"},
    "timeout_s": 600,
}

CONTROLNET_URL = "https://example.com/pose.png"


def parse(document: Any) -> Job:
    """Parse `document` sent as JSON."""
    return parse_message(json.dumps(document))


def invalid(document: Any) -> InvalidJob:
    """The `InvalidJob` that parsing `document` raises."""
    body = document if isinstance(document, str) else json.dumps(document)
    with pytest.raises(InvalidJob) as caught:
        parse_message(body)
    return caught.value


def guidance(tasktype: str, content: dict[str, Any], **metadata: Any) -> dict[str, Any]:
    """A guidance v1alpha2 task document for the Web UI."""
    meta = {"id": "g-1", "runtime": "sdruntime", "tasktype": tasktype, "prefix": "output"}
    return {"metadata": meta | metadata, "content": content}


def sns_envelope(message: dict[str, Any]) -> dict[str, Any]:
    """`message` as SNS delivers it to SQS without raw delivery."""
    return {
        "Type": "Notification",
        "MessageId": "8e1c2b5a-0000-4000-8000-000000000000",
        "TopicArn": "arn:aws:sns:us-east-1:123456789012:sd-jobs",
        "Message": json.dumps(message),
        "Timestamp": "2026-11-25T08:00:00.000Z",
        "MessageAttributes": {"runtime": {"Type": "String", "Value": "sdruntime"}},
    }


# --- native -----------------------------------------------------------------------------------


def test_the_contract_example_parses_as_a_native_job() -> None:
    """The example message of contract section 4 parses with every field kept."""
    job = parse(NATIVE_EXAMPLE)
    assert job.format == "native"
    assert job.id == "fox-0001"
    assert job.spec.backend == "diffusers"
    assert job.spec.params.seed == 42
    assert job.spec.output.bucket == "my-bucket"
    assert job.spec.context == {"user": "u-17"}


def test_a_null_input_is_dropped() -> None:
    """An input given as null (`"mask": null`) is absent from the job."""
    assert parse(NATIVE_EXAMPLE).spec.inputs == {"image": "s3://bucket/in/fox.png"}


def test_seed_minus_one_means_the_worker_picks() -> None:
    """Seed -1 is normalised to None."""
    job = parse({"id": "j", "task": "txt2img", "params": {"seed": -1}})
    assert job.spec.params.seed is None


def test_params_keep_extra_keys_for_backends() -> None:
    """Unknown parameter keys are kept for the backends that read them."""
    job = parse({"id": "j", "task": "txt2img", "params": {"clip_skip": 2}})
    assert job.spec.params.model_extra == {"clip_skip": 2}


def test_a_minimal_job_takes_the_defaults() -> None:
    """A job with only an id and a task gets the default parameters and outputs."""
    spec = parse({"id": "j", "task": "txt2img"}).spec
    assert (spec.version, spec.params.width, spec.params.steps) == (1, 512, 20)
    assert spec.output.format == "png"


def test_a_workflow_job_may_carry_its_graph_in_native() -> None:
    """Task `workflow` is satisfied by a native body instead of a graph."""
    assert parse({"id": "j", "task": "workflow", "native": {"prompt": {}}}).spec.task == "workflow"


def test_a_job_spec_can_be_built_in_code() -> None:
    """`JobSpec` validates when built directly, as `sdworker submit` does."""
    assert JobSpec(id="fox-1", task="txt2img").params.batch_size == 1


# --- invalid messages -------------------------------------------------------------------------


def test_an_id_with_a_slash_is_refused_naming_the_field() -> None:
    """An id with '/' names `id`, the rule and the value."""
    error = invalid({"id": "a/b", "task": "txt2img"})
    assert str(error) == "id: must match [A-Za-z0-9._-]{1,128} (got 'a/b')"


def test_an_id_of_two_dots_is_refused() -> None:
    """The id '..' cannot become an S3 key segment."""
    assert str(invalid({"id": "..", "task": "txt2img"})).startswith("id: must not be '.'")


def test_an_id_containing_two_dots_is_refused() -> None:
    """An id containing '..' is refused."""
    assert str(invalid({"id": "a..b", "task": "txt2img"})).startswith("id: ")


def test_a_missing_id_is_refused_without_a_job_id() -> None:
    """A message without an id names `id` and carries no job id."""
    error = invalid({"task": "txt2img"})
    assert (str(error), error.job_id) == ("id: required", None)


def test_an_unknown_task_names_the_choices_and_keeps_the_id() -> None:
    """An unknown task lists the tasks, and the readable id is kept for the failure notice."""
    error = invalid({"id": "j-1", "task": "paint"})
    expected = "task: must be one of txt2img, img2img, inpaint, upscale, workflow (got 'paint')"
    assert (str(error), error.job_id) == (expected, "j-1")


def test_a_body_that_is_not_json_says_where_parsing_stopped() -> None:
    """Malformed JSON is reported with the parser's position."""
    error = invalid("not json")
    assert (str(error), error.job_id) == (
        "body is not JSON: Expecting value at line 1 column 1",
        None,
    )


def test_a_body_that_is_not_an_object_is_refused() -> None:
    """A JSON array is not a job."""
    assert str(invalid([1, 2])) == "body: must be a JSON object (got list)"


def test_a_file_input_is_refused_naming_the_input() -> None:
    """A `file:` URI names the input it was given for."""
    error = invalid({"id": "j-1", "task": "img2img", "inputs": {"image": "file:///etc/passwd"}})
    assert str(error).startswith("inputs.image: must be an s3://, https://, http:// or data: URI")
    assert error.job_id == "j-1"


def test_img2img_without_an_image_is_refused() -> None:
    """Task img2img needs `inputs.image` when no native body is given."""
    error = invalid({"id": "j-1", "task": "img2img"})
    assert str(error) == "inputs.image: required for task img2img (or give native)"


def test_inpaint_without_a_mask_is_refused() -> None:
    """Task inpaint needs `inputs.mask` as well."""
    error = invalid({"id": "j-1", "task": "inpaint", "inputs": {"image": "s3://b/i.png"}})
    assert str(error).startswith("inputs.mask: required for task inpaint")


def test_a_workflow_task_without_a_graph_is_refused() -> None:
    """Task workflow needs `workflow` (or `native`)."""
    assert str(invalid({"id": "j", "task": "workflow"})).startswith("workflow: required")


def test_an_extra_top_level_field_is_refused_as_a_likely_typo() -> None:
    """An unknown top-level field is named."""
    error = invalid({"id": "j-1", "task": "txt2img", "parms": {}})
    assert (str(error), error.job_id) == ("parms: unknown field (got {})", "j-1")


def test_every_wrong_field_is_reported_at_once() -> None:
    """All errors are listed, separated by '; ', each with its dotted path."""
    error = invalid({"id": "j", "task": "txt2img", "params": {"width": 4, "steps": 0}})
    assert str(error) == (
        "params.width: input should be greater than or equal to 8 (got 4); "
        "params.steps: input should be greater than or equal to 1 (got 0)"
    )


def test_a_non_positive_timeout_is_refused() -> None:
    """`timeout_s` must be greater than zero."""
    assert str(invalid({"id": "j", "task": "txt2img", "timeout_s": 0})).startswith("timeout_s: ")


# --- guidance v1alpha2 ------------------------------------------------------------------------


def test_a_guidance_text_to_image_becomes_txt2img() -> None:
    """A guidance text-to-image document maps onto a txt2img job answered in its format."""
    job = parse(guidance("text-to-image", {"prompt": "a dog"}, context={"k": 1}))
    assert (job.format, job.spec.task, job.runtime, job.tasktype) == (
        "guidance",
        "txt2img",
        "sdruntime",
        "text-to-image",
    )
    assert (job.spec.backend, job.spec.context, job.spec.output.prefix) == (
        None,
        {"k": 1},
        "output",
    )


def test_a_guidance_request_body_is_kept_as_native() -> None:
    """The Web UI request is passed through as `native`."""
    content = {"prompt": "a dog", "steps": 16, "alwayson_scripts": {}}
    assert parse(guidance("text-to-image", content)).spec.native == content


def test_a_guidance_request_is_mapped_onto_params() -> None:
    """Web UI parameter names are mapped onto the normalised ones."""
    content = {
        "prompt": "a dog",
        "negative_prompt": "cat",
        "width": 768,
        "height": 640,
        "steps": 16,
        "cfg_scale": 5.5,
        "sampler_name": "Euler a",
        "scheduler": "karras",
        "seed": 7,
        "batch_size": 2,
        "n_iter": 3,
        "denoising_strength": 0.4,
        "override_settings": {"sd_model_checkpoint": "v2-1.safetensors"},
    }
    params = parse(guidance("text-to-image", content)).spec.params
    assert params.model_dump() == {
        "prompt": "a dog",
        "negative_prompt": "cat",
        "width": 768,
        "height": 640,
        "steps": 16,
        "guidance_scale": 5.5,
        "sampler": "Euler a",
        "scheduler": "karras",
        "seed": 7,
        "batch_size": 6,
        "model": "v2-1.safetensors",
        "strength": 0.4,
    }


def test_a_guidance_image_to_image_takes_its_url_as_the_image_input() -> None:
    """The URL in `init_images[0]` becomes `inputs.image`."""
    content = {"init_images": ["https://example.com/cat.png"], "prompt": "cat wizard"}
    job = parse(guidance("image-to-image", content))
    assert (job.spec.task, job.spec.inputs) == ("img2img", {"image": "https://example.com/cat.png"})


def test_a_guidance_controlnet_url_is_keyed_by_its_json_pointer() -> None:
    """Any other URL in the body is an input keyed by the JSON pointer of its place."""
    scripts = {"controlnet": {"args": [{"image": CONTROLNET_URL, "module": "openpose"}]}}
    job = parse(guidance("text-to-image", {"prompt": "a dancer", "alwayson_scripts": scripts}))
    assert job.spec.inputs == {"/alwayson_scripts/controlnet/args/0/image": CONTROLNET_URL}


def test_a_guidance_image_to_image_with_a_mask_is_inpaint() -> None:
    """A mask in an image-to-image request makes it an inpaint job with a mask input."""
    content = {"init_images": ["s3://b/in.png"], "mask": "s3://b/mask.png"}
    job = parse(guidance("image-to-image", content))
    assert (job.spec.task, job.spec.inputs["mask"]) == ("inpaint", "s3://b/mask.png")


def test_a_guidance_base64_image_becomes_a_data_uri_input() -> None:
    """A raw base64 `init_images[0]` is given to other backends as a data URI."""
    job = parse(guidance("image-to-image", {"init_images": ["iVBORw0KGgo="]}))
    assert job.spec.inputs == {"image": "data:;base64,iVBORw0KGgo="}


def test_a_guidance_extra_single_image_is_an_upscale() -> None:
    """extra-single-image maps onto upscale, with its image, scale and upscaler."""
    content = {
        "image": "https://example.com/small.png",
        "upscaling_resize": 4,
        "upscaler_1": "R-ESRGAN",
    }
    job = parse(guidance("extra-single-image", content))
    assert (job.spec.task, job.spec.inputs) == (
        "upscale",
        {"image": "https://example.com/small.png"},
    )
    assert job.spec.params.model_extra == {"scale": 4, "upscaler": "R-ESRGAN"}


def test_a_comfyui_pipeline_becomes_a_workflow_job() -> None:
    """A comfyui pipeline document carries its graph as `workflow`."""
    graph = {"3": {"class_type": "KSampler", "inputs": {"seed": 89465186141685}}}
    job = parse(guidance("pipeline", graph, runtime="comfyui"))
    assert (job.spec.task, job.spec.workflow, job.spec.native) == ("workflow", graph, None)


def test_urls_in_a_pipelines_image_loaders_become_inputs_keyed_by_node() -> None:
    """A LoadImage given a URL is fetched by the worker: the URL becomes inputs[node id]."""
    graph = {
        "10": {"class_type": "LoadImage", "inputs": {"image": "s3://bucket/in/fox.png"}},
        "11": {"class_type": "LoadImage", "inputs": {"image": "already-uploaded.png"}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["10", 0]}},
    }
    job = parse(guidance("pipeline", graph, runtime="comfyui"))
    assert job.spec.inputs == {"10": "s3://bucket/in/fox.png"}


def test_a_pipeline_from_a_runtime_with_another_name_is_a_workflow_job() -> None:
    """tasktype `pipeline` is a workflow whatever the runtime is named, as in the guidance."""
    assert parse(guidance("pipeline", {"3": {}})).spec.task == "workflow"


def test_a_guidance_id_is_cut_to_64_characters() -> None:
    """A 100-character guidance id is cut to 64, as the guidance's agent does."""
    assert parse(guidance("text-to-image", {}, id="x" * 100)).id == "x" * 64


def test_a_guidance_document_without_prefix_writes_under_the_id() -> None:
    """Without `metadata.prefix` the output prefix is empty, so objects go under `<id>/`."""
    document = {"metadata": {"id": "g-2", "tasktype": "text-to-image"}, "content": {}}
    assert parse(document).spec.output.prefix == ""


def test_an_unknown_guidance_tasktype_lists_the_known_ones() -> None:
    """An unknown tasktype names `metadata.tasktype` and keeps the id."""
    error = invalid(guidance("foo", {}))
    assert str(error) == (
        "metadata.tasktype: unknown 'foo'; expected text-to-image, image-to-image, "
        "extra-single-image, extra-batch-images or pipeline"
    )
    assert error.job_id == "g-1"


def test_a_wrong_guidance_parameter_is_named_by_its_content_key() -> None:
    """A mapped parameter out of range is named by its place in `content`."""
    error = invalid(guidance("text-to-image", {"cfg_scale": 500}))
    assert str(error) == "content.cfg_scale: input should be less than or equal to 100 (got 500)"


def test_a_guidance_document_without_metadata_id_is_refused() -> None:
    """A missing `metadata.id` is named."""
    assert str(invalid({"metadata": {"tasktype": "text-to-image"}, "content": {}})) == (
        "metadata.id: required"
    )


# --- guidance v1alpha1 ------------------------------------------------------------------------

LEGACY_IMG2IMG: dict[str, Any] = {
    "alwayson_scripts": {
        "task": "image-to-image",
        "image_link": "https://example.com/cat.png",
        "id_task": "test-i2i",
        "sd_model_checkpoint": "v2-1_768-ema-pruned.safetensors",
        "save_dir": "outputs",
        "sd_vae": "auto",
        "override_settings": {"CLIP_stop_at_last_layers": 2},
        "controlnet": {"args": []},
    },
    "prompt": "cat wizard",
    "steps": 16,
    "override_settings": {"eta_noise_seed_delta": 31337},
}


def test_a_legacy_request_is_routed_by_its_alwayson_scripts() -> None:
    """A v1alpha1 request gets its id, task, model and prefix from `alwayson_scripts`."""
    job = parse(LEGACY_IMG2IMG)
    assert (job.format, job.id, job.spec.task, job.tasktype) == (
        "guidance",
        "test-i2i",
        "img2img",
        "image-to-image",
    )
    assert (job.spec.params.model, job.spec.output.prefix) == (
        "v2-1_768-ema-pruned.safetensors",
        "outputs",
    )


def test_a_legacy_request_loses_its_routing_keys() -> None:
    """The routing keys leave `alwayson_scripts`; the image link and settings move into the body."""
    assert parse(LEGACY_IMG2IMG).spec.native == {
        "alwayson_scripts": {"controlnet": {"args": []}},
        "prompt": "cat wizard",
        "steps": 16,
        "override_settings": {"eta_noise_seed_delta": 31337, "CLIP_stop_at_last_layers": 2},
        "init_images": ["https://example.com/cat.png"],
    }


def test_a_legacy_image_link_is_the_image_input() -> None:
    """`alwayson_scripts.image_link` becomes `inputs.image`."""
    assert parse(LEGACY_IMG2IMG).spec.inputs == {"image": "https://example.com/cat.png"}


def test_a_legacy_save_dir_that_climbs_out_is_not_a_prefix() -> None:
    """A `save_dir` that is not a plain relative path is ignored."""
    scripts = {"task": "text-to-image", "id_task": "t", "save_dir": "../elsewhere"}
    assert parse({"alwayson_scripts": scripts, "prompt": "dog"}).spec.output.prefix == ""


def test_a_legacy_request_without_id_task_falls_back_to_uid() -> None:
    """`uid` gives the id when `id_task` is absent."""
    scripts = {"task": "text-to-image", "uid": "u-9"}
    assert parse({"alwayson_scripts": scripts}).id == "u-9"


def test_a_legacy_request_without_an_id_names_id_task() -> None:
    """A v1alpha1 request with no id names `alwayson_scripts.id_task`."""
    error = invalid({"alwayson_scripts": {"task": "text-to-image"}})
    assert str(error) == "alwayson_scripts.id_task: required"


# --- SNS envelopes ----------------------------------------------------------------------------


def test_a_native_job_in_an_sns_envelope_is_unwrapped() -> None:
    """SNS → SQS without raw delivery: the job is the envelope's `Message`."""
    job = parse(sns_envelope(NATIVE_EXAMPLE))
    assert (job.format, job.id) == ("native", "fox-0001")


def test_a_guidance_document_in_an_sns_envelope_is_unwrapped() -> None:
    """The guidance's own path (SNS → SQS) delivers its document in an envelope."""
    job = parse(sns_envelope(guidance("text-to-image", {"prompt": "a dog"})))
    assert (job.format, job.id, job.spec.params.prompt) == ("guidance", "g-1", "a dog")


def test_an_sns_envelope_around_malformed_json_says_so() -> None:
    """A `Message` that is not JSON is reported as such."""
    envelope = sns_envelope({}) | {"Message": "{oops"}
    assert str(invalid(envelope)).startswith("Message is not JSON: ")


# --- message_format ---------------------------------------------------------------------------


def test_the_format_of_an_invalid_guidance_message_can_still_be_told() -> None:
    """A guidance document that fails validation is still recognised as guidance."""
    assert message_format(json.dumps(sns_envelope(guidance("foo", {})))) == "guidance"


def test_the_format_of_garbage_is_native() -> None:
    """A body that is not JSON is answered in the native format."""
    assert message_format("garbage") == "native"
